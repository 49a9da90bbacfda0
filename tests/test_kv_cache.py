"""Block allocator and block tables: ref counts, copy-on-write forks, rollback."""

from __future__ import annotations

import torch

from branchwise.engine.kv_cache import BlockManager, new_pool
from branchwise.engine.sequence import SamplingParams, Sequence


def seq(i: int, n: int) -> Sequence:
    return Sequence(i, str(i), 0, list(range(n)), n, SamplingParams(), "ar", torch.Generator())


def test_allocate_truncate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    s = seq(0, 10)
    assert bm.blocks_needed(s, 10) == 3
    bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free == 5
    s.num_computed = 10
    bm.allocate(s, 13)  # drafts reach into a fourth block
    assert len(s.block_table) == 4
    bm.truncate(s, 11)  # rollback keeps only the blocks of the first 11 slots
    assert len(s.block_table) == 3 and bm.num_free == 5
    bm.free(s)
    assert bm.num_free == 8 and all(c == 0 for c in bm.ref_counts)


def test_fork_shares_blocks_and_copies_a_partly_filled_block_on_write():
    bm = BlockManager(8, 4)
    bm.pools.append(new_pool(1, 8, 4, 1, 2, torch.float32, "cpu"))
    parent, child = seq(0, 6), seq(1, 6)
    bm.allocate(parent, 6)
    parent.num_computed = 6
    bm.pools[0][0, 0, parent.block_table[1]] = 7.0  # slots 4..5 written, 6..7 free
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and bm.num_free == 6
    assert bm.blocks_needed(child, 7) == 1  # copy-on-write of the shared last block
    bm.allocate(child, 7)
    assert child.block_table[0] == parent.block_table[0]  # the full block stays shared
    assert child.block_table[1] != parent.block_table[1]
    assert torch.equal(bm.pools[0][0, 0, child.block_table[1]], bm.pools[0][0, 0, parent.block_table[1]])
    assert bm.ref_counts[parent.block_table[0]] == 2 and bm.ref_counts[parent.block_table[1]] == 1
    bm.allocate(parent, 7)  # now the parent owns its block alone: no copy
    assert bm.num_free == 5
    bm.free(parent)
    bm.free(child)
    assert bm.num_free == 8


def test_move_slots_compacts_kv_in_every_pool():
    bm = BlockManager(4, 4)
    bm.pools += [new_pool(2, 4, 4, 1, 1, torch.float32, "cpu") for _ in range(2)]
    for pool in bm.pools:
        pool.view(2, 2, 16, 1, 1)[..., 0, 0] = torch.arange(16.0)
    bm.move_slots(torch.tensor([9, 13]), torch.tensor([5, 6]))
    for pool in bm.pools:
        flat = pool.view(2, 2, 16)
        assert flat[1, 1, 5] == 9 and flat[0, 0, 6] == 13 and flat[0, 0, 7] == 7
