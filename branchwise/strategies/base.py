"""The strategy interface: `propose` what to feed the target this step, `verify` what its logits accept.

A strategy sees only its `StrategyContext` (facts and verbs, `engine/context.py`), never the engine. It
returns Plans (tokens, positions, an optional intra-step mask) that the engine packs into the step's one
forward, and Verdicts (new tokens, which fed tokens' K/V to keep) that the engine commits: appending
tokens, stop checks, rollback, compaction. What it needs besides the target (weights, K/V of its own) it
declares in `resources`, and the engine loads and budgets it at start-up. A subclass that overrides
nothing but `name` decodes exactly as `ar`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from branchwise.engine import sampler
from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.sequence import Sequence
from branchwise.engine.stats import StepStats

if TYPE_CHECKING:
    from branchwise.config import EngineConfig
    from branchwise.engine.context import StrategyContext


@dataclass
class Resources:
    """What a strategy runs besides the target, found and loaded once at start-up."""

    weights: Any  # a draft model, an MTP module, Medusa heads: handed to the strategy's constructor
    kv_shape: tuple[int, int, int] | None = None  # (layers, kv_heads, head_dim) of a K/V pool of its own
    path: str | None = None  # where the weights came from


class Strategy:
    """Autoregressive decoding; the base every other strategy extends."""

    name: ClassVar[str] = "ar"
    lossless: ClassVar[bool] = True
    # lookahead and propose also take a sequence with several pending tokens: a grammar's forced
    # continuation after the sampled token, or the rest of its prompt (the prefill's forward then verifies
    # the first drafts); the plan feeds them all, drafts after them. Else such tokens go in a plain chunk
    # of their own and the step drafts nothing for that sequence
    drafts_past_pending: ClassVar[bool] = False

    @classmethod
    def resources(
        cls, config: EngineConfig, model_path: str, model: torch.nn.Module, dtype: torch.dtype, device
    ) -> Resources | None:
        """Find and load what the strategy needs besides the target (None: nothing, or nothing found)."""
        return None

    def __init__(self, ctx: StrategyContext, resources: Resources | None = None) -> None:
        self.ctx = ctx

    def parse_params(self, params: dict) -> dict:
        """Validate a request's strategy params (raise ValueError with a clear message)."""
        if params:
            raise ValueError(f"strategy '{self.name}' takes no params, got {sorted(params)}")
        return {}

    def begin_step(self, stats: StepStats) -> None:
        """The engine's measurements, before it schedules the next step (adaptive strategies read them)."""

    def lookahead(self, seq: Sequence) -> int:
        """Tokens past its pending ones that `seq` would like to feed this step (drafts); no side effects."""
        return 0

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        """One Plan per decode-ready sequence, in order; budgets[i] caps how many tokens seqs[i] may feed."""
        return [Plan(s, s.token_ids[s.num_computed :], start=s.num_computed) for s in seqs]

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        """One Verdict per plan: chain verification (accept a prefix of the drafts, then sample one)."""
        return verify_chains(self.ctx, plans, out)

    def on_forward(self, plans: list[Plan], out: ForwardOutput) -> None:
        """After the target forward, before verification: every plan of this strategy's sequences,
        prefill chunks included (an MTP module keeps the hidden states it drafts from)."""

    def on_commit(self, seq: Sequence) -> None:
        """After the engine appended a step's tokens to `seq` (still running)."""

    def on_finish(self, seq: Sequence) -> None:
        """`seq` ended (finished, aborted, failed): forget what the strategy holds for it."""

    def on_preempt(self, seq: Sequence) -> None:
        """`seq`'s K/V was freed for a recompute: forget state that referred to it."""
        seq.strategy_state = None

    def reset_cache(self) -> None:
        """Forget what earlier requests' outputs taught (a benchmark starts every run from the same state)."""


def verify_chains(ctx: StrategyContext, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
    """The chain rule over plans whose drafts (possibly none) are the tail of their tokens."""
    seqs = [p.seq for p in plans]
    first = [row + p.num_logits - len(p.drafts) - 1 for p, row in zip(plans, out.logits_rows, strict=True)]
    probs = None
    if any(p.draft_probs is not None for p in plans):
        probs = _stack_draft_probs(plans, out.logits.shape[-1], out.logits.device)
    # only logits processing reads them (min_tokens)
    stop_ids = [ctx.stop_token_ids(s) for s in seqs] if any(s.params.processes_logits for s in seqs) else []
    drafts = [p.drafts for p in plans]
    bitmask = None
    if any(s.matcher is not None for s in seqs):
        matchers = matchers_to_mask(seqs, first, drafts, out.logits)
        if any(m is not None for m in matchers):
            bitmask = grammar_masks(ctx, matchers, drafts, [p.draft_masks for p in plans])
    num_acc, nxt = sampler.verify_chains(out.logits, seqs, first, drafts, stop_ids, probs, bitmask)
    verdicts = []
    for p, a, t, r in zip(plans, num_acc, nxt, first, strict=True):
        pending = len(p.tokens) - len(p.drafts)
        if not a and pending == 1:  # nothing drafted or nothing accepted: the common verdict, made cheaply
            verdicts.append(Verdict([t], [r], [0]))
        else:
            verdicts.append(Verdict(p.drafts[:a] + [t], list(range(r, r + a + 1)), list(range(pending + a))))
    return verdicts


def matchers_to_mask(
    seqs: list[Sequence], first: list[int], drafts: list[list[int]], logits: torch.Tensor
) -> list:
    """Each sequence's matcher, or None where no mask can change its verdict: unconstrained, or greedy
    without penalties with the target's own argmax allowed by the grammar at every verified row (it is then
    the masked argmax too; one `validate_tokens` a row, against a mask of the whole vocabulary)."""
    matchers = [s.matcher for s in seqs]
    quick = [
        b
        for b, s in enumerate(seqs)
        if s.matcher is not None and s.params.greedy and not s.params.processes_logits
    ]
    if not quick:
        return matchers
    rows = [first[b] + k for b in quick for k in range(len(drafts[b]) + 1)]
    best = sampler.argmax(logits[torch.tensor(rows, device=logits.device)]).tolist()
    at = 0
    for b in quick:
        d, m = drafts[b], matchers[b]
        if all(m.validate_tokens([*d[:k], best[at + k]]) == k + 1 for k in range(len(d) + 1)):
            matchers[b] = None
        at += len(d) + 1
    return matchers


def _stack_draft_probs(plans: list[Plan], vocab: int, device: torch.device) -> torch.Tensor:
    K = max(len(p.drafts) for p in plans)
    probs = torch.zeros(len(plans), max(K, 1), vocab, device=device)
    for b, p in enumerate(plans):
        if p.drafts:
            if p.draft_probs is None:  # a deterministic draft among sampled ones: point mass
                probs[b, torch.arange(len(p.drafts)), torch.tensor(p.drafts)] = 1.0
            else:
                probs[b, : len(p.drafts)] = p.draft_probs
    return probs


def grammar_masks(
    ctx: StrategyContext, matchers: list, drafts: list[list[int]], known: list | None = None
) -> torch.Tensor:
    """(B, K + 1, V/32) int32 bitmasks of the allowed tokens at every verified row of each chain, each with
    the matcher state *of that row*: a matcher (None: unconstrained, all allowed) advances through its
    chain's drafts, then rolls back. known[b]: chain b's drafted rows as its drafter masked them, or None."""
    K = max(len(d) for d in drafts)
    constrained = [b for b, m in enumerate(matchers) if m is not None]
    started = time.perf_counter()
    rows = ctx.grammars().masks(
        [matchers[b] for b in constrained],
        [drafts[b] for b in constrained],
        None if known is None else [known[b] for b in constrained],
    )
    ctx.metrics.mask_time.labels(ctx.model_name).observe(time.perf_counter() - started)
    bitmask = torch.full((len(matchers), K + 1, rows.shape[-1]), -1, dtype=torch.int32)
    at = 0
    for b in constrained:
        n = len(drafts[b]) + 1
        bitmask[b, :n] = rows[at : at + n]
        at += n
    return bitmask
