"""Multiverse (arXiv 2506.09991): independent sub-problems decoded as parallel paths over a shared prefix.

A sequence decodes autoregressively until it closes a `<Goal>` block holding k >= 2 `<Outline>`s (at most
`max_paths`, a request param, default 8). Then it spawns k hidden path sequences that share its blocks (no
copy; a path's first write into the shared, partly filled last block copies that block) and pauses. Path i
starts with the forced tokens `<Path>i:` at the position right after `</Goal>`, decodes in the same
batched steps as any other sequence and never sees the other paths. A path ends once its `</Path>` is in
the cache; one that outgrows what the request may still write (its max_tokens, the context) is closed
there. When all have ended, the parent takes the paths' tokens in outline order, adopts their K/V after
its prefix (`adopt_kv`), positions go on after the longest path (as in training) and `<Conclusion>` is
forced: the conclusion attends to every path. The client sees one ordinary completion; a streaming client
gets each path's text once it and every path before it have closed. Under a grammar each path advances its
own copy of the matcher, and the parent's matcher takes the paths in order. Under KV pressure the engine
swaps a family (parent and paths) out and back whole, so outputs equal those without pressure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.sequence import Sequence
from branchwise.engine.stats import StepStats
from branchwise.strategies.base import Resources, Strategy, verify_chains

if TYPE_CHECKING:
    from branchwise.engine.context import StrategyContext

MAX_PATHS = 8
TAGS = ("<Goal>", "</Goal>", "<Outline>", "</Path>", "<Conclusion>")


@dataclass
class MultiverseState:
    path_start: int | None = None  # a path: where its own tokens start (None: not a path)
    path_end: int = 0  # a path is closed once it reaches this many tokens
    closing: bool = False  # the path's `</Path>` is appended; its K/V is computed next, nothing sampled
    done: bool = False  # the path's `</Path>` is in the cache
    fork_start: int | None = None  # paused while its paths run: where they start
    shown: int = 0  # paths whose tokens the parent has taken (in outline order)
    steps: int = 0  # engine steps in which the request (or one of its paths) decoded
    last_step: int = -1


class MultiverseStrategy(Strategy):
    name = "multiverse"

    def __init__(self, ctx: StrategyContext, resources: Resources | None = None) -> None:
        super().__init__(ctx)
        vocab = ctx.tokenizer.get_vocab()
        missing = [t for t in TAGS if t not in vocab]
        if missing:
            raise ValueError(
                f"strategy 'multiverse' needs a model trained with the Multiverse tags; this tokenizer "
                f"lacks {missing} (the demo model has them)"
            )
        self.goal, self.goal_end, self.outline, self.path_end, self.conclusion = (vocab[t] for t in TAGS)
        self.step = 0

    def parse_params(self, params: dict) -> dict:
        """`max_paths`: the most paths one `<Goal>` may fork (more decode sequentially)."""
        unknown = set(params) - {"max_paths"}
        if unknown:
            raise ValueError(f"strategy 'multiverse' takes only max_paths, got {sorted(unknown)}")
        k = params.get("max_paths", MAX_PATHS)
        if not (isinstance(k, int) and not isinstance(k, bool) and 2 <= k <= 64):
            raise ValueError("max_paths must be an integer in [2, 64]")
        return {"max_paths": k}

    def state(self, seq: Sequence) -> MultiverseState:
        if seq.strategy_state is None:
            seq.strategy_state = MultiverseState()
        return seq.strategy_state

    def begin_step(self, stats: StepStats) -> None:
        self.step = stats.step

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        plans = []
        for seq in seqs:
            closing = seq.strategy_state is not None and seq.strategy_state.closing
            # a closing path only computes the K/V of its `</Path>`: no token is sampled after it
            plans.append(Plan(seq, seq.token_ids[seq.num_computed :], num_logits=0 if closing else 1))
        return plans

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        for p in plans:  # the paths of one request decoding in a step count as one step of it
            st = self.state(p.seq.top)
            if st.last_step != self.step:
                st.last_step, st.steps = self.step, st.steps + 1
        return verify_chains(self.ctx, plans, out)

    def on_commit(self, seq: Sequence) -> None:
        st = self.state(seq)
        if st.closing:
            if seq.num_pending == 0:
                self._path_done(seq)
            return
        if seq.num_pending != 1 or seq.num_output_tokens == 0:
            return
        last = seq.token_ids[-1]
        if st.path_start is not None and (last == self.path_end or seq.num_tokens >= st.path_end):
            if last != self.path_end:  # a path that outgrows the request's budget is closed there
                seq.token_ids.append(self.path_end)
            st.closing = True
            return
        if last == self.goal_end:
            self._fork(seq)

    def _fork(self, parent: Sequence) -> None:
        tokens = parent.token_ids
        opened = len(tokens) - 1 - tokens[::-1].index(self.goal) if self.goal in tokens else len(tokens)
        count = tokens[opened:].count(self.outline)
        if not 2 <= count <= parent.strategy_params.get("max_paths", MAX_PATHS):
            return
        ctx = self.ctx
        start = parent.num_tokens  # every path starts right after `</Goal>`
        openers = [ctx.tokenizer.encode(f"<Path>{k}:", add_special_tokens=False) for k in range(1, count + 1)]
        matchers = [None] * count
        if parent.matcher is not None:  # each path follows the grammar from the parent's state on its own
            matchers = [parent.matcher.deep_copy() for _ in openers]
            if not all(m.consume_tokens(forced) for m, forced in zip(matchers, openers, strict=True)):
                return  # the grammar does not allow these paths here: decode sequentially
        # a path may write what the request still may, within the context
        left = (parent.params.max_tokens or ctx.max_model_len) - parent.num_output_tokens
        end = min(start + left, ctx.max_model_len) - 1  # room for `</Path>`
        for forced, matcher in zip(openers, matchers, strict=True):
            seed = int(torch.randint(2**62, (1,), generator=parent.generator))
            child = ctx.spawn(parent, tokens + forced, torch.Generator().manual_seed(seed), matcher=matcher)
            child.strategy_state = MultiverseState(path_start=start, path_end=max(end, start + len(forced)))
        self.state(parent).fork_start = start
        ctx.pause(parent)  # it waits, holding its blocks, until its paths merge
        ctx.metrics.multiverse_paths.labels(ctx.model_name).inc(count)

    def _path_done(self, path: Sequence) -> None:
        """A path closed: stream the closed paths not yet shown, in outline order; merge after the last."""
        self.state(path).done = True
        self.ctx.pause(path)
        parent = path.parent
        st = self.state(parent)
        paths = parent.children
        while st.shown < len(paths) and self.state(paths[st.shown]).done:
            for token in paths[st.shown].token_ids[st.fork_start :]:
                self.ctx.append(parent, token)  # counts toward max_tokens; may end the request
                if parent.finished:
                    return
            st.shown += 1
        if st.shown == len(paths):
            self._merge(parent)

    def _merge(self, parent: Sequence) -> None:
        st = self.state(parent)
        paths, start = list(parent.children), st.fork_start
        goal_end = start - 1  # the parent's pending `</Goal>`: each path computed it
        lengths = [p.num_tokens - start for p in paths]
        sources = [(paths[0], goal_end, start)] + [(p, start, p.num_tokens) for p in paths]
        st.fork_start, st.shown = None, 0
        self.ctx.adopt_kv(parent, sources, goal_end)  # the paths end; the parent runs again
        # the conclusion's positions go on after the longest path; its K/V index after all of them
        parent.position_offset -= sum(lengths) - max(lengths)
        # K/V from here on is not what a causal forward of these tokens computes: not for other requests
        parent.max_cacheable = (
            goal_end if parent.max_cacheable is None else min(parent.max_cacheable, goal_end)
        )
        self.ctx.append(parent, self.conclusion)

    def on_finish(self, seq: Sequence) -> None:
        st = seq.strategy_state
        if isinstance(st, MultiverseState) and st.steps and not seq.hidden:
            parallelism = self.ctx.metrics.multiverse_parallelism.labels(self.ctx.model_name)
            parallelism.observe(seq.num_output_tokens / st.steps)

    def on_preempt(self, seq: Sequence) -> None:
        """Families swap out whole (their state stays valid); a plain sequence recomputes causally."""
