"""Prompt lookup: draft the continuation of the latest earlier occurrence of the last n tokens.

No extra model: the drafts are a deterministic guess (q is a point mass), verified by the chain rule.
It pays where the output copies its input: extraction, editing, code with repeated identifiers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.sequence import Sequence
from branchwise.engine.stats import StepStats
from branchwise.strategies.base import Resources, Strategy, verify_chains
from branchwise.strategies.speculative import Acceptance, AdaptiveK, parse_k_params

if TYPE_CHECKING:
    from branchwise.engine.context import StrategyContext

MAX_NGRAM, MIN_NGRAM = 4, 1


def lookup(tokens: list[int], k: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the longest matching suffix n-gram."""
    arr = np.asarray(tokens)
    last = len(arr) - 1
    # ends of earlier matches of the last token (each with a token after it), then of longer suffixes:
    # each n keeps the ends whose match of n - 1 tokens extends one further back
    ends = np.flatnonzero(arr[:last] == arr[last]) if last > 0 else arr[:0]
    found = ends if min_n <= 1 else arr[:0]
    for n in range(2, max_n + 1):
        ends = ends[ends >= n - 1]
        ends = ends[arr[ends - (n - 1)] == arr[last - n + 1]]
        if not ends.size:
            break
        if n >= min_n:
            found = ends
    if not found.size:
        return []
    at = int(found[-1]) + 1
    return arr[at : at + k].tolist()


class NgramStrategy(Strategy):
    name = "ngram"
    drafts_past_pending = True

    def __init__(self, ctx: StrategyContext, resources: Resources | None = None) -> None:
        super().__init__(ctx)
        self.k = AdaptiveK(self.name, ctx.config.num_speculative_tokens)

    def parse_params(self, params: dict) -> dict:
        return parse_k_params(self.name, params)

    def begin_step(self, stats: StepStats) -> None:
        self.k.begin_step(stats)

    def lookahead(self, seq: Sequence) -> int:
        return self.k.draft_length(seq, seq.strategy_state or Acceptance(), self.ctx.max_model_len)

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        plans = []
        for seq, budget in zip(seqs, budgets, strict=True):
            room = budget - seq.num_pending
            drafts = lookup(seq.token_ids, room) if room > 0 else []
            if drafts and seq.matcher is not None:  # cut at the first token the grammar forbids
                drafts = drafts[: seq.matcher.validate_tokens(drafts)]
            pending = seq.token_ids[seq.num_computed :]
            plans.append(Plan(seq, pending + drafts, num_logits=len(drafts) + 1, drafts=drafts))
        self.k.drafting |= any(p.drafts for p in plans)
        return plans

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        verdicts = verify_chains(self.ctx, plans, out)
        for p, v in zip(plans, verdicts, strict=True):
            if p.drafts:
                if p.seq.strategy_state is None:
                    p.seq.strategy_state = Acceptance()
                self.k.observe(p.seq.strategy_state, len(p.drafts), len(v.tokens) - 1)
        return verdicts
