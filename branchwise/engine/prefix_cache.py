"""Radix prefix cache: full KV blocks shared by every request that starts with the same tokens.

A radix tree over token ids, one edge per full block (block_size tokens): a node owns one KV block and
holds one reference to it. A new sequence shares the blocks of its longest cached prefix and skips their
prefill; sequences add their computed full blocks as they go and when they end. When the allocator runs
out, the least recently used leaves that no sequence references are evicted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from branchwise.engine.kv_cache import BlockManager
from branchwise.engine.sequence import Sequence


@dataclass(eq=False)
class Node:
    block: int
    parent: Node | None
    key: tuple[int, ...] = ()
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    last_used: int = 0


class PrefixCache:
    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self.bs = blocks.block_size
        self.root = Node(block=-1, parent=None)
        self._clock = itertools.count(1)
        self.num_nodes = 0
        self.num_evicted = 0
        blocks.evict = self.evict

    def _walk(self, tokens: list[int], num_blocks: int):
        """Yield (block index, node or None) along tokens' path; stops at the first missing block."""
        node = self.root
        for j in range(num_blocks):
            node = node.children.get(tuple(tokens[j * self.bs : (j + 1) * self.bs]))
            if node is None:
                return
            yield j, node

    def attach(self, seq: Sequence) -> int:
        """Share the cached blocks of seq's longest cached prefix (at least one token is left to compute,
        for its logits); returns the number of tokens served from the cache."""
        assert not seq.block_table and seq.num_computed == 0
        now = next(self._clock)
        for _, node in self._walk(seq.token_ids, (seq.num_tokens - 1) // self.bs):
            node.last_used = now
            self.blocks.incref(node.block)
            seq.block_table.append(node.block)
        seq.num_computed = len(seq.block_table) * self.bs
        return seq.num_computed

    def insert(self, seq: Sequence) -> None:
        """Adopt seq's full blocks of computed tokens (where the tree has none for that prefix yet)."""
        node, now = self.root, next(self._clock)
        limit = seq.num_computed if seq.max_cacheable is None else min(seq.num_computed, seq.max_cacheable)
        for j in range(limit // self.bs):
            key = tuple(seq.token_ids[j * self.bs : (j + 1) * self.bs])
            child = node.children.get(key)
            if child is None:
                child = Node(block=seq.block_table[j], parent=node, key=key)
                self.blocks.incref(child.block)
                self.blocks.cached.add(child.block)
                node.children[key] = child
                self.num_nodes += 1
            child.last_used = now
            node = child

    def evict(self, n: int) -> int:
        """Free up to n blocks of unreferenced LRU leaves; n = 0: how many could be freed."""
        if n == 0:
            return self._evictable()
        freed = 0
        while freed < n:
            leaves = [x for x in self._nodes() if not x.children and self.blocks.ref_counts[x.block] == 1]
            if not leaves:
                break
            leaves.sort(key=lambda x: x.last_used)
            for leaf in leaves[: n - freed]:
                del leaf.parent.children[leaf.key]
                self.blocks.cached.discard(leaf.block)
                self.blocks.num_idle_cached -= 1
                self.blocks.decref(leaf.block)
                self.num_nodes -= 1
                freed += 1
        self.num_evicted += freed
        return freed

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def _evictable(self) -> int:
        """Blocks in subtrees that no sequence references (children are counted before parents)."""
        whole: dict[Node, bool] = {}
        for node in reversed(list(self._nodes())):  # _nodes yields parents before their children
            whole[node] = self.blocks.ref_counts[node.block] == 1 and all(
                whole[c] for c in node.children.values()
            )
        return sum(whole.values())
