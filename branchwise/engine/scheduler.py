"""Continuous batching: who runs this step, with how many new tokens, within the token and KV budgets.

There is no prefill or decode phase: every running sequence catches its computed tokens up to its total,
in chunks of at most the step's remaining token budget (chunked prefill); a decode-ready sequence feeds its
one pending token plus whatever its strategy drafts. Running sequences go first, in arrival order; when
KV blocks run out the most recently admitted one is preempted (its blocks freed, recomputed later). A
sequence admitted from the queue first shares the blocks of its longest cached prefix (prefix cache).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from branchwise.config import EngineConfig
from branchwise.engine.kv_cache import BlockManager
from branchwise.engine.prefix_cache import PrefixCache
from branchwise.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, max_model_len: int) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.on_preempt: Callable[[Sequence], None] = lambda seq: None
        self.prefix_cache: PrefixCache | None = None
        self.on_cache_hit: Callable[[Sequence, int], None] = lambda seq, num_tokens: None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if self.prefix_cache is not None:  # its computed blocks stay cached: recompute may hit them
            self.prefix_cache.insert(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self.on_preempt(seq)

    def schedule(self, lookahead: Callable[[Sequence], int]) -> list[tuple[Sequence, int]]:
        """[(sequence, number of tokens it feeds)], with KV blocks allocated for those tokens."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            room = self.max_model_len - seq.num_computed
            want = min(budget, room, 1 + lookahead(seq) if seq.num_pending == 1 else seq.num_pending)
            while not self.blocks.can_allocate(seq, seq.num_computed + want):
                if want > 1 and seq.num_pending == 1:
                    want = 1  # drop the drafts before taking blocks from anyone else
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, seq.num_computed + want)
                scheduled.append((seq, want))
                budget -= want
                i += 1
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if len(self.running) + 1 + len(seq.forks) > self.max_num_seqs:
                break
            if self.prefix_cache is not None and not seq.block_table:
                self.on_cache_hit(seq, self.prefix_cache.attach(seq))
            want = min(budget, seq.num_pending)
            if not self.blocks.can_allocate(seq, seq.num_computed + want):
                self.blocks.free(seq)  # let go of the cached blocks while it waits
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.status = Status.RUNNING
            self.blocks.allocate(seq, seq.num_computed + want)
            scheduled.append((seq, want))
            budget -= want
        return scheduled
