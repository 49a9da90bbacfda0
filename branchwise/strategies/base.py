"""The strategy interface: `propose` what to feed the target this step, `verify` what its logits accept.

A strategy never touches attention or KV bookkeeping. It returns Plans (tokens, positions, an optional
intra-step mask) that the engine packs into the step's one forward, and Verdicts (new tokens, which fed
tokens' K/V to keep) that the engine commits: appending tokens, stop checks, rollback, compaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from branchwise.constraints import unpack
from branchwise.engine import sampler
from branchwise.engine.sequence import Sequence

if TYPE_CHECKING:
    from branchwise.engine.engine import LLMEngine
    from branchwise.engine.model_runner import ForwardOutput


@dataclass
class Plan:
    """The tokens one sequence feeds the target this step."""

    seq: Sequence
    tokens: list[int]  # the sequence's pending tokens, then any drafted tokens
    num_logits: int = 1  # logits wanted for the last num_logits fed tokens
    prompt_rows: int = 0  # the first of those rows score prompt tokens (prompt_logprobs), never sample
    positions: list[int] | None = None  # None: consecutive from `start`
    mask: torch.Tensor | None = None  # (n, n) bool intra-step mask; None: causal
    start: int | None = None  # KV index of tokens[0]; None: seq.num_computed
    first_block: int = 0  # attend only to K/V from this block of the sequence on (MTP after a cache hit)
    drafts: list[int] = field(default_factory=list)  # drafted chain (the tail of `tokens`)
    draft_probs: torch.Tensor | None = None  # (len(drafts), V) drafter distribution, None if deterministic
    payload: Any = None  # strategy-owned (e.g. a tree's retrieve indices)
    logits_row: int = -1  # filled in by the runner: first row of this plan's logits
    token_row: int = -1  # filled in by the runner: this plan's first token in the packed batch

    def __post_init__(self) -> None:
        if self.start is None:
            self.start = self.seq.num_computed


@dataclass
class Verdict:
    """What verification decided for one sequence."""

    tokens: list[int]  # new tokens in order: accepted drafts, then the one sampled token
    logit_rows: list[int]  # the logits row that scored each new token (for logprobs)
    kv_keep: list[int]  # offsets into plan.tokens whose K/V stays, in sequence order


class Strategy:
    """Autoregressive decoding; the base every other strategy extends."""

    name: ClassVar[str] = "ar"
    lossless: ClassVar[bool] = True

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    def parse_params(self, params: dict) -> dict:
        """Validate a request's strategy params (raise ValueError with a clear message)."""
        if params:
            raise ValueError(f"strategy '{self.name}' takes no params, got {sorted(params)}")
        return {}

    def lookahead(self, seq: Sequence) -> int:
        """Tokens beyond the pending one that `seq` would like to feed this step (drafts)."""
        return 0

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        """Plans for decode-ready sequences; budgets[i] caps how many tokens seqs[i] may feed (>= 1)."""
        return [Plan(seq=s, tokens=s.token_ids[s.num_computed :]) for s in seqs]

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        """Chain verification: accept a prefix of each plan's drafts, then sample one token."""
        seqs = [p.seq for p in plans]
        first = [p.logits_row + p.num_logits - len(p.drafts) - 1 for p in plans]
        probs = None
        if any(p.draft_probs is not None for p in plans):
            probs = _stack_draft_probs(plans, out.logits.shape[-1], out.logits.device)
        stop_ids = [self.engine.stop_token_ids(s) for s in seqs]
        allowed = None
        if any(s.matcher is not None for s in seqs):
            matchers = [s.matcher for s in seqs]
            drafts = [p.drafts for p in plans]
            allowed = grammar_masks(self.engine, matchers, drafts, out.logits.shape[-1], out.logits.device)
        num_acc, nxt = sampler.verify_chains(
            out.logits, seqs, first, [p.drafts for p in plans], stop_ids, probs, allowed
        )
        verdicts = []
        for p, a, t, r in zip(plans, num_acc, nxt, first, strict=True):
            pending = len(p.tokens) - len(p.drafts)
            verdicts.append(Verdict(p.drafts[:a] + [t], list(range(r, r + a + 1)), list(range(pending + a))))
        return verdicts

    def on_forward(self, plans: list[Plan], out: ForwardOutput) -> None:
        """After the target forward, before verification: every plan of this strategy's sequences,
        prefill chunks included (an MTP module keeps the hidden states it drafts from)."""

    def on_commit(self, seq: Sequence) -> None:
        """After the engine appended a step's tokens to `seq` (still running)."""

    def on_finish(self, seq: Sequence) -> None:
        """`seq` ended (finished, aborted, failed): release what the strategy holds for it."""

    def on_preempt(self, seq: Sequence) -> None:
        """Forget per-sequence state that referred to the freed K/V."""
        seq.strategy_state = None


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
    engine: LLMEngine, matchers: list, drafts: list[list[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """(B, K + 1, V) allowed tokens at every verified row of each chain, each with the matcher state *of
    that row*: a matcher (None: unconstrained) advances through its chain's drafts, then rolls back."""
    K = max(len(d) for d in drafts)
    constrained = [b for b, m in enumerate(matchers) if m is not None]
    started = time.perf_counter()
    bitmask = engine.grammars().masks([matchers[b] for b in constrained], [drafts[b] for b in constrained])
    engine.metrics.mask_time.labels(engine.model_name).observe(time.perf_counter() - started)
    rows = unpack(bitmask, vocab, device)
    allowed = torch.ones(len(matchers), K + 1, vocab, dtype=torch.bool, device=device)
    at = 0
    for b in constrained:
        n = len(drafts[b]) + 1
        allowed[b, :n] = rows[at : at + n]
        at += n
    return allowed
