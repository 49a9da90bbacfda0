"""What every chain-drafting strategy shares: how many tokens to draft for each sequence, this step.

Drafting k tokens pays when the expected number of extra accepted tokens beats what feeding them costs.
With a per-token acceptance rate a, the k-th drafted token is used with probability a^k; feeding it costs
`per_token` seconds of the target forward (fitted online from the engine's own steps) plus its drafting
cost, against a step that yields `goodput` tokens per second. So a sequence drafts every k with
a^k > (per_token + draft_cost) * goodput: at batch 1 a step is mostly fixed cost and drafting is nearly
free; at high load the forward is compute-bound, per_token * goodput nears 1 and K falls to 0 unless the
drafts are almost always right. Nothing here changes outputs: verification keeps them lossless.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from branchwise.engine.sequence import Sequence
from branchwise.strategies.base import Plan, Strategy, Verdict

if TYPE_CHECKING:
    from branchwise.engine.engine import LLMEngine
    from branchwise.engine.model_runner import ForwardOutput

DECAY = 0.9  # per step, a sequence's acceptance evidence fades: one that stopped drafting is retried
PLAIN_EVERY = 16  # every 16th step nobody drafts: the yardstick speculation must beat
WINDOW = 3  # plain steps per comparison


class CostModel:
    """seconds ~= fixed + per_token * tokens, fitted online by exponentially weighted least squares."""

    def __init__(self, decay: float = 0.97) -> None:
        self.decay = decay
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.w, self.x, self.y = d * self.w + 1, d * self.x + tokens, d * self.y + seconds
        self.xx, self.xy = d * self.xx + tokens * tokens, d * self.xy + tokens * seconds

    def fit(self) -> tuple[float, float]:
        """(fixed, per_token) seconds; per_token is 0 until the token counts have varied."""
        if self.w == 0:
            return 0.0, 0.0
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        slope = (self.xy / self.w - mx * my) / var if var > 1e-6 * max(1.0, mx * mx) else 0.0
        slope = min(max(slope, 0.0), my / max(mx, 1.0))  # between free and all-proportional
        return my - slope * mx, slope


class SpeculativeStrategy(Strategy):
    """A chain drafter (draft model, n-gram, MTP) with an adaptive number of drafted tokens."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine)
        self.max_drafts = engine.config.num_speculative_tokens
        self.accepted, self.rejected = 2.0, 1.0  # strategy-wide evidence: the prior of a new sequence
        self.rng = random.Random(engine.config.seed)
        # The cost model misses host overheads (drafting, verification bookkeeping), so the realised rate
        # of steps with speculation is checked against steps without: while it is lower, a penalty on
        # the threshold grows until drafting stops paying for itself no more.
        self.window = {True: (0, 0.0), False: (0, 0.0)}  # drafting? -> (tokens, seconds) of such steps
        self.window_plain_steps = 0
        self.penalty = 1.0
        self.step = -1
        self.plain = False  # this step nobody drafts
        self.drafting = False  # some sequence drafts this step
        self.num_candidates = 1

    def parse_params(self, params: dict) -> dict:
        """`num_speculative_tokens`: a fixed number of drafted tokens for this request (no adaptation)."""
        unknown = set(params) - {"num_speculative_tokens"}
        if unknown:
            raise ValueError(
                f"strategy '{self.name}' takes only num_speculative_tokens, got {sorted(unknown)}"
            )
        k = params.get("num_speculative_tokens")
        if k is not None and not (isinstance(k, int) and 0 <= k <= 16):
            raise ValueError("num_speculative_tokens must be an integer in [0, 16]")
        return dict(params)

    def draft_cost(self) -> float:
        """Seconds spent drafting one token (a deterministic lookup: 0)."""
        return 0.0

    def state(self, seq: Sequence) -> dict:
        if seq.strategy_state is None:
            seq.strategy_state = {"accepted": 0.0, "rejected": 0.0}
        return seq.strategy_state

    def acceptance(self, seq: Sequence) -> float:
        """Estimated probability that the sequence's next drafted token is accepted."""
        st = self.state(seq)
        prior = self.accepted / (self.accepted + self.rejected)
        return (st["accepted"] + 2 * prior) / (st["accepted"] + st["rejected"] + 2)

    def lookahead(self, seq: Sequence) -> int:
        st = self.state(seq)
        st["accepted"] *= DECAY
        st["rejected"] *= DECAY
        left = (seq.params.max_tokens or self.engine.max_model_len) - seq.num_output_tokens
        room = min(self.max_drafts, left - 1, self.engine.max_model_len - seq.num_tokens - 1)
        fixed = seq.strategy_params.get("num_speculative_tokens")
        if fixed is not None:
            return max(0, min(fixed, left - 1, self.engine.max_model_len - seq.num_tokens - 1))
        if room <= 0:
            return 0
        if self.engine.num_steps != self.step:
            self._new_step()
        if self.plain:
            return 0
        _, per_token = self.engine.step_cost.fit()
        threshold = (per_token + self.draft_cost()) * self.engine.goodput * self.penalty
        alpha, k = self.acceptance(seq), 0
        while k < room and alpha ** (k + 1) > threshold:
            k += 1
        self.drafting |= k > 0
        return k

    def _new_step(self) -> None:
        """Credit the last step to its mode, steer the penalty every few plain steps, pick this step's mode.

        Drafting steps and plain steps interleave, so over a window of WINDOW plain steps both see the same
        requests and nearly the same batch: if the drafting steps yielded fewer tokens per second than the
        plain ones, the penalty triples; if more, it falls; with no drafting in the window it fades slowly,
        so a lighter load tries again. Steps that carry prefill chunks say nothing about decoding: skipped.
        """
        engine = self.engine
        if self.step >= 0 and not engine.last_step_prefilled and engine.last_step_tokens:
            mode = None if self.plain else (True if self.drafting else None)
            if self.plain:
                mode = False
            if mode is not None:
                tokens, seconds = self.window[mode]
                self.window[mode] = (tokens + engine.last_step_tokens, seconds + engine.last_step_seconds)
                self.window_plain_steps += not mode
        if self.window_plain_steps >= WINDOW:
            (spec_tokens, spec_s), (plain_tokens, plain_s) = self.window[True], self.window[False]
            if spec_tokens == 0:
                self.penalty /= 1.2
            elif spec_tokens / spec_s < plain_tokens / plain_s:
                self.penalty *= 3.0
            else:
                self.penalty /= 1.5
            self.penalty = min(max(self.penalty, 1.0), 1e4)
            self.window = {True: (0, 0.0), False: (0, 0.0)}
            self.window_plain_steps = 0
        self.step = engine.num_steps
        self.plain = self.step % PLAIN_EVERY == 0
        self.drafting = False
        # the sequences that may draft this step share each draft forward's fixed cost
        self.num_candidates = max(1, sum(s.strategy == self.name for s in engine.scheduler.running))

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        verdicts = super().verify(plans, out)
        for p, v in zip(plans, verdicts, strict=True):
            if p.drafts:
                st = self.state(p.seq)
                accepted, rejected = len(v.tokens) - 1, int(len(v.tokens) - 1 < len(p.drafts))
                st["accepted"] += accepted
                st["rejected"] += rejected
                self.accepted = 0.99 * self.accepted + accepted
                self.rejected = 0.99 * self.rejected + rejected
        return verdicts
