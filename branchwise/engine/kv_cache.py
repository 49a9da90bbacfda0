"""Paged KV cache: ref-counted blocks, per-sequence block tables, fork with copy-on-write, rollback.

Slot arithmetic: token i of a sequence lives in slot
`block_table[i // block_size] * block_size + i % block_size` of every pool. All pools (target model,
draft model, MTP module) share the block ids, so one block table addresses a sequence's K/V in each of
them and one truncate rolls all of them back.

    block_table = [7, 2, 9]      block_size = 4, num_computed = 10
    slots        7*4+0 .. 7*4+3 | 2*4+0 .. 2*4+3 | 9*4+0, 9*4+1 | (9*4+2, 9*4+3 free for the next tokens)
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable

import torch

from branchwise.engine.sequence import Sequence


def new_pool(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """One model's K/V storage: (layers, 2, blocks, block_size, kv_heads, head_dim)."""
    return torch.zeros(
        num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
    )


def pool_block_bytes(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


class BlockManager:
    """Allocates block ids with reference counts and keeps every sequence's block table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # a heap: the lowest free id is taken first, so a sequence that grows alone gets consecutive blocks
        # (attention on the CPU then reads its K/V as one view instead of gathering the blocks)
        self.free_blocks: list[int] = list(range(num_blocks))
        self.pools: list[torch.Tensor] = []
        # Set by the prefix cache: frees up to n unreferenced cached blocks, returns how many it freed.
        self.evict: Callable[[int], int] | None = None
        self.cached: set[int] = set()  # blocks the prefix cache holds a reference to
        self.num_idle_cached = 0  # cached blocks nothing else references (reusable after eviction)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_available(self) -> int:
        """Free blocks plus cached blocks that no sequence holds (what `kv_cache_free_blocks` reports)."""
        return len(self.free_blocks) + self.num_idle_cached

    # -- block ids --------------------------------------------------------------------------------
    def _take(self) -> int:
        if not self.free_blocks and self.evict is not None:
            self.evict(16)  # a batch: each eviction scans the cache
        block = heapq.heappop(self.free_blocks)
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        self.ref_counts[block] += 1
        if self.ref_counts[block] == 2 and block in self.cached:
            self.num_idle_cached -= 1

    def decref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            heapq.heappush(self.free_blocks, block)
        elif self.ref_counts[block] == 1 and block in self.cached:
            self.num_idle_cached += 1

    # -- sequences --------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks needed so that slots [num_computed, num_tokens) are writable by `seq` alone."""
        have = len(seq.block_table)
        need = max(0, -(-num_tokens // self.block_size) - have)
        first = seq.num_computed // self.block_size
        if first < have and num_tokens > seq.num_computed and self.ref_counts[seq.block_table[first]] > 1:
            need += 1  # copy-on-write of a shared, partly filled block
        return need

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(seq, num_tokens)
        if need <= self.num_free:
            return True
        return self.evict is not None and need <= self.num_free + self.evict(0)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Make slots [num_computed, num_tokens) writable; call can_allocate first."""
        table = seq.block_table
        first = seq.num_computed // self.block_size
        if first < len(table) and num_tokens > seq.num_computed and self.ref_counts[table[first]] > 1:
            shared = table[first]
            table[first] = self._take()
            self.copy_block(shared, table[first])
            self.decref(shared)
        while len(table) * self.block_size < num_tokens:
            table.append(self._take())

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Roll back: keep only the blocks that hold the first num_tokens slots."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self.decref(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.decref(block)
        seq.block_table = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent; the first write into a shared block copies it."""
        for block in parent.block_table:
            self.incref(block)
        child.block_table = list(parent.block_table)
        child.num_computed = parent.num_computed

    # -- swapping: K/V that no causal recompute gives back (parallel paths) -----------------------------
    def swap_out(self, seqs: list[Sequence]) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Copy the blocks the sequences hold to the host (a shared block once) and free them; returns
        (per pool (layers, 2, n, block_size, heads, dim), each sequence's table as indices into the n)."""
        unique = list(dict.fromkeys(b for s in seqs for b in s.block_table))
        index = {b: i for i, b in enumerate(unique)}
        tables = [[index[b] for b in s.block_table] for s in seqs]
        data = self.read_blocks(unique)
        for s in seqs:
            self.free(s)
        return data, tables

    def can_swap_in(self, image: tuple[list[torch.Tensor], list[list[int]]]) -> bool:
        need = image[0][0].shape[2] if image[0] else 0
        return need <= self.num_free or (self.evict is not None and need <= self.num_free + self.evict(0))

    def swap_in(self, seqs: list[Sequence], image: tuple[list[torch.Tensor], list[list[int]]]) -> None:
        """Give the sequences fresh blocks holding what `swap_out` copied, shared as they were."""
        data, tables = image
        fresh = [self._take() for _ in range(data[0].shape[2])]
        self.write_blocks(fresh, data)
        for s, table in zip(seqs, tables, strict=True):
            s.block_table = [fresh[i] for i in table]
        for i, count in Counter(i for table in tables for i in table).items():
            self.ref_counts[fresh[i]] = count

    def image(self, *slot_data: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[int]]]:
        """A one-sequence swap image (as `swap_out` gives) of `gather`ed K/V, the pieces in slot order."""
        data = []
        for parts in zip(*slot_data, strict=True):
            slots = torch.cat([part.cpu() for part in parts], dim=2)  # (layers, 2, n, heads, dim)
            pad = -slots.shape[2] % self.block_size
            slots = torch.nn.functional.pad(slots, (0, 0, 0, 0, 0, pad))
            data.append(slots.view(*slots.shape[:2], -1, self.block_size, *slots.shape[3:]))
        return data, [list(range(data[0].shape[2]))]

    # -- data movement in every pool ---------------------------------------------------------------
    def read_blocks(self, blocks: list[int]) -> list[torch.Tensor]:
        """A host copy of `blocks`, per pool: (layers, 2, len(blocks), block_size, kv_heads, head_dim)."""
        return [pool[:, :, torch.tensor(blocks, device=pool.device)].to("cpu") for pool in self.pools]

    def write_blocks(self, blocks: list[int], data: list[torch.Tensor]) -> None:
        """Write what `read_blocks` gave back into `blocks` (the same count) of every pool."""
        for pool, values in zip(self.pools, data, strict=True):
            pool[:, :, torch.tensor(blocks, device=pool.device)] = values.to(pool.device)

    def copy_block(self, src: int, dst: int) -> None:
        for pool in self.pools:
            pool[:, :, dst].copy_(pool[:, :, src])

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V of slots `src` into slots `dst` in every pool (tree-path compaction)."""
        for pool in self.pools:
            flat = pool.view(pool.shape[0], 2, -1, *pool.shape[4:])
            flat[:, :, dst] = flat[:, :, src]

    def gather(self, slots: list[int], device: torch.device | str | None = None) -> list[torch.Tensor]:
        """A copy of the K/V in `slots`, per pool: (layers, 2, len(slots), kv_heads, head_dim)."""
        out = []
        for pool in self.pools:
            flat = pool.view(pool.shape[0], 2, -1, *pool.shape[4:])
            out.append(flat[:, :, torch.tensor(slots, device=pool.device)].to(device or pool.device))
        return out

    def scatter(self, slots: list[int], data: list[torch.Tensor]) -> None:
        """Write what `gather` gave back into `slots` (the same count) of every pool."""
        for pool, values in zip(self.pools, data, strict=True):
            flat = pool.view(pool.shape[0], 2, -1, *pool.shape[4:])
            flat[:, :, torch.tensor(slots, device=pool.device)] = values.to(pool.device)

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[i // bs] * bs + i % bs for i in range(start, end)]
