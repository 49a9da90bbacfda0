"""How many tokens a speculative strategy drafts for each sequence, this step (composed into each one).

Drafting k tokens pays when the expected number of extra accepted tokens beats what feeding them costs.
With a per-token acceptance rate a, the k-th drafted token is used with probability a^k; feeding it costs
`per_token` seconds of the target forward (fitted online from the engine's own steps) plus its drafting
cost (or, if more, what this strategy's whole steps grow by per fed token: host work counted), against a
step that yields `goodput` tokens per second (the smoothed rate, capped by the smoothed rate per sequence
times the sequences running or waiting, so that a drained batch is not judged by the full one before it, and
raised to what a plain step of the batch now running yields by the fitted cost, so that a batch that just
filled up is not judged by the drained one before it). So a sequence drafts every k with
a^k > cost * goodput: at batch 1 a step is mostly fixed cost and drafting is nearly free; at high load the
forward is compute-bound, cost * goodput nears 1 and K falls to 0 unless the drafts are almost always
right. Nothing here changes outputs: verification keeps them lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

from branchwise.engine.sequence import Sequence
from branchwise.engine.stats import CostModel, StepStats

DECAY = 0.9  # per step, a sequence's acceptance evidence fades: one that stopped drafting is retried
PLAIN_EVERY = 16  # every 16th step nobody drafts: the yardstick speculation must beat
# and halfway between two of them, a probe: drafting as the target forward's cost alone says it pays (no
# penalty, no whole-step slope), so that a controller that stopped drafting (a burst of load on the machine
# can teach it that anything costs) keeps measuring drafting steps, and drafts again once they pay
WINDOW = 3  # plain steps per comparison


@dataclass
class Acceptance:
    """A sequence's evidence of how often its drafts are accepted, as of step `step` (it fades)."""

    accepted: float = 0.0
    rejected: float = 0.0
    step: int = 0


def parse_k_params(name: str, params: dict) -> dict:
    """`num_speculative_tokens`: a fixed number of drafted tokens for a request (no adaptation)."""
    unknown = set(params) - {"num_speculative_tokens"}
    if unknown:
        raise ValueError(f"strategy '{name}' takes only num_speculative_tokens, got {sorted(unknown)}")
    k = params.get("num_speculative_tokens")
    if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= 16):
        raise ValueError("num_speculative_tokens must be an integer in [0, 16]")
    return dict(params)


class AdaptiveK:
    """One strategy's drafting controller: per-sequence draft lengths from acceptance and step costs, and a
    penalty that grows while steps with drafts yield less than plain steps (the cost model misses host
    overheads: drafting, verification bookkeeping)."""

    def __init__(self, name: str, max_drafts: int) -> None:
        self.name, self.max_drafts = name, max_drafts
        self.accepted, self.rejected = 2.0, 1.0  # strategy-wide evidence: the prior of a new sequence
        self.window = {True: (0, 0.0), False: (0, 0.0)}  # drafting? -> (tokens, seconds) of such steps
        self.window_plain_steps = self.window_pairs = 0
        self.last: tuple[bool, tuple[int, float]] | None = None  # the last step: drafted?, (tokens, seconds)
        self.penalty = 1.0
        self.step_cost = CostModel()  # whole steps of this strategy alone (drafting included) vs tokens fed
        self.goodput = self.step_slope = 0.0  # this step's, from the stats and step_cost
        self.stats = StepStats()
        self.plain = False  # this step nobody drafts
        self.probe = False  # this step drafts by the target forward's cost alone
        self.drafting = False  # some sequence drafted this step (the strategy says so in propose)
        self.num_candidates = 1  # sequences that may draft this step: they share a draft forward's cost

    def begin_step(self, stats: StepStats) -> None:
        """Credit the last step to its mode, steer the penalty every few comparisons, pick this step's mode.

        Wherever a step with drafts and a step without (a forced plain step, or one where no sequence
        chose to draft) follow each other, the two run nearly the same batch, even while it drains or
        fills: each such pair is credited, the drafting step to one side, the plain step to the other.
        Every WINDOW plain steps, or sooner once 2 * WINDOW pairs are in, the penalty moves by the square
        of the drafting steps' tokens per second over the plain ones': up by at most 3x if they yielded
        less; if more, down by at most 1.5x (3x from above 3), and a whole-step fit that forbids every
        draft is dropped (stale); with no pair at all it fades slowly, so a lighter load tries again. A
        step as large as the gain or loss, rather than a fixed 3x up and 1.5x down, does not drift upwards
        under timing noise when drafting pays a little. Steps that carry prefill chunks say
        nothing about decoding: skipped, and no pair spans them.
        """
        skipped = (
            stats.step <= 1 or stats.last_prefilled or not stats.last_tokens or not stats.running[self.name]
        )
        drafted = None if skipped else self.drafting
        sample = (stats.last_tokens, stats.last_seconds)
        if drafted is not None and stats.running[self.name] == sum(stats.running.values()):
            self.step_cost.observe(stats.last_fed, stats.last_seconds)
        if drafted is not None and self.last is not None and self.last[0] != drafted:
            spec, plain = (sample, self.last[1]) if drafted else (self.last[1], sample)
            for mode, (tokens, seconds) in ((True, spec), (False, plain)):
                total, time_ = self.window[mode]
                self.window[mode] = (total + tokens, time_ + seconds)
            self.window_pairs += 1
        self.last = None if drafted is None else (drafted, sample)
        self.window_plain_steps += self.plain
        if self.window_plain_steps >= WINDOW or self.window_pairs >= 2 * WINDOW:
            (spec_tokens, spec_s), (plain_tokens, plain_s) = self.window[True], self.window[False]
            if spec_tokens == 0:
                self.penalty /= 1.2
            # drafting's tokens/s over plain's (a pair's steps committed tokens; a zero time is a stand-in's)
            elif (ratio := spec_tokens * plain_s / max(spec_s * plain_tokens, 1e-12)) < 1.0:
                self.penalty *= min(ratio**-2, 3.0)
            else:  # drafting steps beat the plain steps beside them
                self.penalty /= min(ratio**2, 3.0 if self.penalty > 3.0 else 1.5)
                if self.step_slope * self.goodput >= 1.0:  # a fit that forbids every draft: stale
                    self.step_cost = CostModel()
            self.penalty = min(max(self.penalty, 1.0), 1e4)
            self.window = {True: (0, 0.0), False: (0, 0.0)}
            self.window_plain_steps = self.window_pairs = 0
        self.stats = stats
        # read by every sequence's draft length this step: fitted once here
        self.goodput = stats.batch_goodput()
        self.step_slope = self.step_cost.fit()[1]
        self.plain = (stats.step - 1) % PLAIN_EVERY == 0
        self.probe = (stats.step - 1) % PLAIN_EVERY == PLAIN_EVERY // 2
        self.drafting = False
        self.num_candidates = max(1, stats.running[self.name])

    def threshold(self, draft_cost: float = 0.0) -> float:
        """The acceptance probability one more drafted token must beat, this step."""
        # what one more fed token costs: the target's share plus drafting's, or, if more, what this
        # strategy's whole steps grow by per fed token (host work of drafting and verifying counted)
        if self.probe:
            return (self.stats.per_token + draft_cost) * self.goodput
        cost = max(self.stats.per_token + draft_cost, self.step_slope)
        return cost * self.goodput * self.penalty

    def depth_pays(self, evidence: list[Acceptance], depth: int, fixed: float, per_token: float) -> bool:
        """Whether one more drafter forward (`fixed` + `per_token` seconds a chain), drafting token
        depth + 1 of the chains still going, yields more than it costs. Its fixed cost is theirs alone:
        the per-sequence rule shares it among every candidate of the batch, and a few deep chains in a
        large batch would pay it at every depth. A probe drafts regardless: the drafter's costs are
        measured only when it runs (one forward over long prompts' catch-up must not stop it for good)."""
        if self.plain or self.probe:
            return not self.plain
        gain = sum(self.acceptance(ev) ** (depth + 1) for ev in evidence)
        cost = fixed + len(evidence) * (per_token + self.stats.per_token)
        return gain > cost * self.goodput * self.penalty

    def acceptance(self, ev: Acceptance) -> float:
        """Estimated probability that the sequence's next drafted token is accepted."""
        fade = DECAY ** max(0, self.stats.step - ev.step)
        prior = self.accepted / (self.accepted + self.rejected)
        return (fade * ev.accepted + 2 * prior) / (fade * (ev.accepted + ev.rejected) + 2)

    def draft_length(self, seq: Sequence, ev: Acceptance, max_model_len: int, draft_cost: float = 0.0) -> int:
        """How many tokens `seq` drafts this step (a request's fixed K, or the adaptive choice)."""
        left = (seq.params.max_tokens or max_model_len) - seq.num_output_tokens
        limit = min(left - 1, max_model_len - seq.num_tokens - 1)
        fixed = seq.strategy_params.get("num_speculative_tokens")
        if fixed is not None:
            return max(0, min(fixed, limit))
        room = min(self.max_drafts, limit)
        if room <= 0 or self.plain:
            return 0
        threshold, alpha, k = self.threshold(draft_cost), self.acceptance(ev), 0
        while k < room and alpha ** (k + 1) > threshold:
            k += 1
        return k

    def observe(self, ev: Acceptance, drafted: int, accepted: int) -> None:
        """A verified chain: `accepted` of its `drafted` tokens stood."""
        ev.accepted *= DECAY ** max(0, self.stats.step - ev.step)
        ev.rejected *= DECAY ** max(0, self.stats.step - ev.step)
        ev.step = self.stats.step
        rejected = int(accepted < drafted)
        ev.accepted += accepted
        ev.rejected += rejected
        self.accepted = 0.99 * self.accepted + accepted
        self.rejected = 0.99 * self.rejected + rejected
