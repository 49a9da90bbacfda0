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
        self.hopeless: list[Sequence] = []  # families that cannot fit even alone: the engine fails them
        self.on_preempt: Callable[[Sequence], None] = lambda seq: None
        self.prefix_cache: PrefixCache | None = None
        self.on_cache_hit: Callable[[Sequence, int], None] = lambda seq, num_tokens: None

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def start(self, seq: Sequence) -> None:
        """A sequence born with blocks (an n > 1 sibling, a spawned path) runs from the next step."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def pause(self, seq: Sequence) -> None:
        """Out of the running list, keeping its blocks, until `resume`."""
        self.remove(seq)
        seq.status = Status.PAUSED

    def resume(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> list[Sequence]:
        """Free `seq`'s blocks for a later recompute (or its family's, swapped out); returns the sequences
        this took off `running`."""
        family = family_of(seq)
        if len(family) > 1 or seq.max_cacheable is not None:
            return self._swap_out(family)
        self.running.remove(seq)
        if self.prefix_cache is not None:  # its computed blocks stay cached: recompute may hit them
            self.prefix_cache.insert(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        self.num_preemptions += 1
        self.on_preempt(seq)
        self.wait(seq)
        return [seq]

    def _swap_out(self, family: list[Sequence]) -> list[Sequence]:
        """Parallel paths and merged ones hold K/V that a causal recompute would not give back: the whole
        family (top sequence and every path, running or paused) waits with a host copy of its blocks."""
        root = family[0]
        was_running = [s in self.running for s in family]
        for s in family:
            self.remove(s)
        root.swapped = (family, [s.status for s in family], was_running, self.blocks.swap_out(family))
        for s in family:
            s.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(root)
        return [s for s, running in zip(family, was_running, strict=True) if running]

    def _swap_in(self, root: Sequence) -> bool:
        family, statuses, was_running, image = root.swapped
        if len(self.running) + sum(was_running) > self.max_num_seqs or not self.blocks.can_swap_in(image):
            return False
        self.waiting.popleft()
        self.blocks.swap_in(family, image)
        for s, status, running in zip(family, statuses, was_running, strict=True):
            s.status = status
            if running:
                self.running.append(s)
        root.swapped = None
        return True

    def release(self, seq: Sequence) -> None:
        """A hidden sequence ends quietly: out of the queues, its blocks back."""
        self.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        if seq in seq.parent.children:
            seq.parent.children.remove(seq)

    def adopt_kv(self, seq: Sequence, sources: list[tuple[Sequence, int, int]], at: int) -> None:
        """`seq` (computed up to `at`) takes the sources' K/V as its slots from `at` on and runs again. The
        sources end first, so that their blocks can be taken; with no room even then, `seq` waits swapped
        out holding that K/V, first in the queue (see `StrategyContext.adopt_kv`)."""
        blocks = self.blocks
        kv = blocks.gather([slot for s, a, b in sources for slot in blocks.slots(s, a, b)])
        released: set[int] = set()
        for source, _, _ in sources:
            if source.seq_id not in released:
                released.add(source.seq_id)
                self.release(source)
        end = at + kv[0].shape[2]
        if blocks.can_allocate(seq, end):
            blocks.allocate(seq, end)
            blocks.scatter(blocks.slots(seq, at, end), kv)
            seq.num_computed = end
            self.resume(seq)
            return
        image = blocks.image(blocks.gather(blocks.slots(seq, 0, at), "cpu"), kv)
        seq.num_computed = end
        blocks.free(seq)
        self.wait(seq, image)

    def wait(self, seq: Sequence, image: tuple | None = None) -> None:
        """Put a sequence that holds no blocks first in the queue; with `image` (a `swap_out`) it comes back
        holding that K/V, running."""
        if image is not None:
            seq.swapped = ([seq], [Status.RUNNING], [True], image)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def schedule(self, lookahead: Callable[[Sequence], int]) -> list[tuple[Sequence, int]]:
        """[(sequence, number of tokens it feeds)], with KV blocks allocated for those tokens."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            room = self.max_model_len - seq.num_computed
            pending = len(seq.token_ids) - seq.num_computed  # (not the property: per sequence and step)
            want = min(budget, room, pending + lookahead(seq))
            if not self.blocks.blocks_needed(seq, seq.num_computed + want):  # most decode steps
                scheduled.append((seq, want))
                budget -= want
                i += 1
                continue
            while not self.blocks.can_allocate(seq, seq.num_computed + want):
                if want > seq.num_pending:
                    want = seq.num_pending  # drop the drafts before taking blocks from anyone else
                    continue
                gone = self._preempt(self.running[-1])
                preempted = True
                if seq in gone and not self.running and len(gone) > 1:
                    self.hopeless.append(family_of(seq)[0])  # its paths alone outgrow the whole cache
                # a family leaves as a whole: members already scheduled this step give their tokens back
                budget += sum(n for s, n in scheduled if s in gone)
                scheduled = [(s, n) for s, n in scheduled if s not in gone]
                i = len(scheduled)  # the scheduled ones are still running[:i], in order
                if seq in gone:
                    break
            else:
                self.blocks.allocate(seq, seq.num_computed + want)
                scheduled.append((seq, want))
                budget -= want
                i += 1
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if seq.swapped is not None:
                if not self._swap_in(seq):
                    break
                continue  # back as it was; it runs from the next step
            if len(self.running) + 1 + len(seq.forks) > self.max_num_seqs:
                break
            wants_prompt_logits = seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0
            if self.prefix_cache is not None and not seq.block_table and not wants_prompt_logits:
                self.on_cache_hit(seq, self.prefix_cache.attach(seq))
            want = min(budget, seq.num_pending + lookahead(seq))  # drafts after a prompt that fits
            if not self.blocks.can_allocate(seq, seq.num_computed + want):
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


def family_of(seq: Sequence) -> list[Sequence]:
    """The top-level sequence of `seq`'s request and every hidden sequence below it, top first."""
    family, stack = [], [seq.top]
    while stack:
        family.append(stack.pop())
        stack += family[-1].children
    return family
