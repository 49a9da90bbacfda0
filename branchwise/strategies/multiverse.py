"""Multiverse (arXiv 2506.09991): independent sub-problems decoded as parallel paths over a shared prefix.

A sequence decodes autoregressively until it closes a `<Goal>` block holding k >= 2 `<Outline>`s. Then
it forks k hidden branch sequences that share its blocks (no copy; a branch's first write into the
shared, partly filled last block copies that block). Branch i starts with the forced tokens `<Path>i:`
at the position right after `</Goal>`, decodes in the same batched steps as any other sequence and never
sees the other branches. A branch ends once its `</Path>` is in the cache (or is closed at
MAX_PATH_TOKENS). When all have ended, the parent takes the paths' tokens in outline order, their K/V
moves into its blocks after the prefix, positions go on after the longest path (as in training) and
`<Conclusion>` is forced: the conclusion attends to every path. The client sees one ordinary completion;
a streaming client gets each path's text once it and every path before it have closed. Under a grammar
each path advances its own copy of the matcher, and the parent's matcher takes the paths in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from branchwise.engine.sequence import Sequence, Status
from branchwise.strategies.base import Plan, Strategy

if TYPE_CHECKING:
    from branchwise.engine.engine import LLMEngine

MAX_PATHS = 8
MAX_PATH_TOKENS = 96
TAGS = ("<Goal>", "</Goal>", "<Outline>", "</Path>", "<Conclusion>")


class MultiverseStrategy(Strategy):
    name = "multiverse"

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine)
        vocab = engine.tokenizer.get_vocab()
        missing = [t for t in TAGS if t not in vocab]
        if missing:
            raise ValueError(
                f"strategy 'multiverse' needs a model trained with the Multiverse tags; this tokenizer "
                f"lacks {missing} (the demo model has them)"
            )
        self.goal, self.goal_end, self.outline, self.path_end, self.conclusion = (vocab[t] for t in TAGS)

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        plans = []
        for seq in seqs:
            closing = (seq.strategy_state or {}).get("closing", False)
            # a closing branch only computes the K/V of its `</Path>`: no token is sampled after it
            plans.append(Plan(seq, seq.token_ids[seq.num_computed :], num_logits=0 if closing else 1))
        return plans

    def on_commit(self, seq: Sequence) -> None:
        st = seq.strategy_state or {}
        if st.get("closing"):
            if seq.num_pending == 0:
                self._branch_done(seq)
            return
        if seq.num_pending != 1 or seq.num_output_tokens == 0:
            return
        last = seq.token_ids[-1]
        if seq.branch_of is not None:
            if last == self.path_end or seq.num_tokens - st["path_start"] >= MAX_PATH_TOKENS:
                if last != self.path_end:  # a runaway path is closed at its limit
                    seq.token_ids.append(self.path_end)
                st["closing"] = True
                return
        if last == self.goal_end:
            self._fork(seq)

    def _fork(self, parent: Sequence) -> None:
        tokens = parent.token_ids
        opened = len(tokens) - 1 - tokens[::-1].index(self.goal) if self.goal in tokens else len(tokens)
        count = tokens[opened:].count(self.outline)
        if not 2 <= count <= MAX_PATHS:
            return
        engine = self.engine
        start = parent.num_tokens  # every path starts right after `</Goal>`
        openers = [
            engine.tokenizer.encode(f"<Path>{k}:", add_special_tokens=False) for k in range(1, count + 1)
        ]
        matchers = [None] * count
        if parent.matcher is not None:  # each path follows the grammar from the parent's state on its own
            matchers = [parent.matcher.deep_copy() for _ in openers]
            if not all(m.consume_tokens(forced) for m, forced in zip(matchers, openers, strict=True)):
                return  # the grammar does not allow these paths here: decode sequentially
        branches = []
        for forced, matcher in zip(openers, matchers, strict=True):
            seed = int(torch.randint(2**62, (1,), generator=parent.generator))
            child = Sequence(
                seq_id=engine.new_seq_id(),
                request_id=parent.request_id,
                index=parent.index,
                token_ids=tokens + forced,
                num_prompt_tokens=parent.num_prompt_tokens,
                params=parent.params,
                strategy=self.name,
                generator=torch.Generator().manual_seed(seed),
                branch_of=parent,
                position_offset=parent.position_offset,
                max_cacheable=parent.max_cacheable,
            )
            child.strategy_state = {"path_start": start}
            child.matcher = matcher
            engine.blocks.fork(parent, child)
            child.status = Status.RUNNING
            engine.scheduler.running.append(child)
            branches.append(child)
        parent.branches = branches
        st = parent.strategy_state or {}
        st["fork_start"] = start
        parent.strategy_state = st
        engine.scheduler.remove(parent)  # it waits, holding its blocks, until its paths merge
        parent.status = Status.PAUSED
        engine.metrics.multiverse_paths.labels(engine.model_name).inc(count)

    def _branch_done(self, branch: Sequence) -> None:
        """A path closed: stream the closed paths not yet shown, in outline order; merge after the last."""
        branch.strategy_state["done"] = True
        self.engine.scheduler.remove(branch)
        parent = branch.branch_of
        st = parent.strategy_state
        branches = parent.branches
        st.setdefault("shown", 0)
        while st["shown"] < len(branches) and branches[st["shown"]].strategy_state.get("done"):
            for token in branches[st["shown"]].token_ids[st["fork_start"] :]:
                self.engine.append(parent, token)  # counts toward max_tokens; may end the request
                if parent.finished:
                    return
            st["shown"] += 1
        if st["shown"] == len(branches):
            self._merge(parent)

    def _merge(self, parent: Sequence) -> None:
        engine, blocks = self.engine, self.engine.blocks
        st = parent.strategy_state
        branches, start = parent.branches, st.pop("fork_start")
        st.pop("shown")
        goal_end = start - 1  # the parent's pending `</Goal>`: each branch computed it
        paths = [b.token_ids[start:] for b in branches]
        tokens = [t for p in paths for t in p]  # already appended to the parent, path by path
        end = start + len(tokens)
        src = blocks.slots(branches[0], goal_end, start)
        for b in branches:
            src += blocks.slots(b, start, b.num_tokens)
        kv = blocks.gather(src)  # a copy: the paths' own blocks go back before the parent takes new ones
        self._release(branches)
        if blocks.can_allocate(parent, end):
            blocks.allocate(parent, end)
            blocks.scatter(blocks.slots(parent, goal_end, end), kv)
            parent.num_computed = end
            engine.scheduler.running.append(parent)
            parent.status = Status.RUNNING
        else:  # no room even so: the parent waits swapped out, as a preempted family does
            parent.num_computed = end
            image = blocks.image(blocks.gather(blocks.slots(parent, 0, goal_end), "cpu"), kv)
            blocks.free(parent)
            engine.scheduler.wait(parent, image)
        # the conclusion's positions go on after the longest path; its K/V index after all of them
        parent.position_offset -= len(tokens) - max(len(p) for p in paths)
        # K/V from here on is not what a causal forward of these tokens computes: not for other requests
        parent.max_cacheable = (
            goal_end if parent.max_cacheable is None else min(parent.max_cacheable, goal_end)
        )
        if parent.branch_of is not None:
            parent.strategy_state = {"path_start": st["path_start"]}
        engine.append(parent, self.conclusion)

    def _release(self, branches: list[Sequence]) -> None:
        for b in branches:
            self.on_finish(b)
            self.engine.scheduler.remove(b)
            self.engine.blocks.free(b)
            b.status = Status.FINISHED
            b.branch_of.branches = []

    def on_finish(self, seq: Sequence) -> None:
        self._release(seq.branches)

    def on_preempt(self, seq: Sequence) -> None:
        """A preempted branch recomputes its prefix + path causally: its state stays valid."""
