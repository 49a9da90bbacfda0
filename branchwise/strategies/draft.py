"""Speculative decoding with a small draft model (Leviathan et al. 2023; Chen et al. 2023), and the chain-
drafting loop every model drafter shares (`draft_chains`; MTP uses it too).

The draft model has its own K/V pool addressed by the same block tables as the target's, so a sequence's
draft K/V lives in the same slots and every rollback of the target's (a truncation) rolls it back too.
Each step the draft first catches up on the tokens it has not seen (the prompt, the last step's accepted
and sampled tokens), then proposes one token per batched forward, K forwards for the deepest chain; the
target scores all drafts in the engine's one forward and the chain rule of `base.py` accepts a prefix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from branchwise.constraints import apply_bitmask
from branchwise.engine import sampler
from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.sequence import Sequence
from branchwise.engine.stats import CostModel, StepStats
from branchwise.models import demo
from branchwise.models.loader import kv_shape, load_model, load_tokenizer
from branchwise.strategies.base import Resources, Strategy, verify_chains
from branchwise.strategies.speculative import Acceptance, AdaptiveK, parse_k_params

if TYPE_CHECKING:
    from branchwise.engine.context import StrategyContext


# a chain stops after a token its drafter gave less probability than this (transformers' default for
# assisted generation): the tokens past an unsure one are mostly rejected, and what a chain does not draft
# is what lets the cap on its length be long where the drafter is sure
DRAFT_CONFIDENCE = 0.4


class ChainDrafter(Protocol):
    """A model drafter: what it feeds at each depth, and one batched forward of its model."""

    cost: CostModel
    k: AdaptiveK

    def draft_plan(self, seq: Sequence, depth: int, drafted: list[int], carry) -> Plan: ...

    def draft_forward(self, plans: list[Plan]) -> tuple[torch.Tensor, list]: ...


def draft_chains(
    ctx: StrategyContext, drafter: ChainDrafter, seqs: list[Sequence], budgets: list[int]
) -> list[Plan]:
    """Draft up to budgets[i] - 1 tokens for each sequence, one batched drafter forward per depth, sampled
    from the drafter's distribution with the request's sampling rules (and grammar, where it has one)."""
    want = [b - s.num_pending for s, b in zip(seqs, budgets, strict=True)]
    drafts: list[list[int]] = [[] for _ in seqs]
    probs: list[list[torch.Tensor]] = [[] for _ in seqs]
    masks: list[list[torch.Tensor]] = [[] for _ in seqs]  # the grammar's rows, reused by verification
    active = [i for i, k in enumerate(want) if k > 0]
    consumed = [0] * len(seqs)  # drafted tokens each matcher advanced through
    carry: list = [None] * len(seqs)  # what a drafter passes from one depth to the next
    try:  # the matchers advance through the drafts; they roll back even if drafting fails
        for depth in range(max((want[i] for i in active), default=0)):
            idx = [i for i in active if want[i] > depth]
            if not idx:  # every chain still going has met the end of its grammar
                break
            pinned = any("num_speculative_tokens" in seqs[i].strategy_params for i in idx)
            evidence = [_evidence(seqs[i].strategy_state) for i in idx]
            if not pinned and not drafter.k.depth_pays(evidence, depth, *drafter.cost.fit()):
                break
            plans = [drafter.draft_plan(seqs[i], depth, drafts[i], carry[i]) for i in idx]
            started = time.perf_counter()
            logits, carried = drafter.draft_forward(plans)
            for j, i in enumerate(idx):
                carry[i] = carried[j]
            group = [seqs[i] for i in idx]
            if any(s.params.logit_bias for s in group):  # the bias moves the target: the draft too
                logits = logits + sampler.logit_bias(group, logits.shape[-1], logits.device)
            if any(s.matcher is not None for s in group):  # draft only what the grammar allows
                bitmask = _bitmask(ctx, group)
                logits = apply_bitmask(logits, bitmask)
                for j, i in enumerate(idx):
                    masks[i].append(bitmask[j])
            if all(s.params.greedy for s in group):  # one-hot distributions: their argmax, not built
                q, tokens = None, sampler.argmax(logits).tolist()
                confidence = logits.softmax(-1).amax(-1).tolist()
            else:
                q = sampler.target_probs(logits[:, None], group)[:, 0]
                u = torch.tensor(
                    [0.5 if s.params.greedy else float(torch.rand(1, generator=s.generator)) for s in group]
                )
                sampled = sampler.sample_from(q, u.to(q.device))
                tokens = sampled.tolist()
                confidence = q.gather(-1, sampled[:, None])[:, 0].tolist()
            drafter.cost.observe(sum(len(p.tokens) for p in plans), time.perf_counter() - started)
            for j, i in enumerate(idx):
                drafts[i].append(tokens[j])
                if q is not None:
                    probs[i].append(q[j])
                pinned = "num_speculative_tokens" in seqs[i].strategy_params  # a request's K is drafted
                if confidence[j] < DRAFT_CONFIDENCE and not pinned:
                    want[i] = depth + 1
                matcher = seqs[i].matcher
                if matcher is not None:  # advanced through the draft here, rolled back below
                    consumed[i] += matcher.consume_token(tokens[j])
                    if matcher.is_stopped():
                        want[i] = depth + 1  # the grammar ends here: nothing to draft after it
    finally:
        for seq, n in zip(seqs, consumed, strict=True):
            if n:
                seq.matcher.rollback(n)
    plans = []
    for seq, d, q, m in zip(seqs, drafts, probs, masks, strict=True):
        pending = seq.token_ids[seq.num_computed :]
        # a greedy draft is deterministic: the chain rule then needs no q (a point mass)
        q_t = torch.stack(q) if d and not seq.params.greedy else None
        m_t = torch.stack(m) if d and seq.matcher is not None else None
        plans.append(Plan(seq, pending + d, len(d) + 1, drafts=d, draft_probs=q_t, draft_masks=m_t))
    return plans


def _evidence(state) -> Acceptance:
    """A sequence's acceptance evidence (a fresh one before its first draft: the strategy's prior)."""
    return state if isinstance(state, Acceptance) else Acceptance()


def _bitmask(ctx: StrategyContext, seqs: list[Sequence]) -> torch.Tensor:
    """(B, V/32) the grammar's allowed tokens for each sequence now (all for one without a grammar)."""
    constrained = [j for j, s in enumerate(seqs) if s.matcher is not None]
    rows = ctx.grammars().masks([seqs[j].matcher for j in constrained], [[]] * len(constrained))
    bitmask = torch.full((len(seqs), rows.shape[-1]), -1, dtype=torch.int32)
    bitmask[constrained] = rows
    return bitmask


@dataclass
class DraftState(Acceptance):
    computed: int = 0  # tokens whose draft K/V is in the cache


class DraftStrategy(Strategy):
    name = "draft"
    drafts_past_pending = True  # the draft model catches up on them like on any token it has not seen

    @classmethod
    def resources(cls, config, model_path, model, dtype, device) -> Resources | None:
        path = demo.resolve_draft(model_path, config.draft_model)
        if path is None:
            return None
        draft = load_model(path, dtype, device)
        return Resources(draft, kv_shape(draft), path)

    def __init__(self, ctx: StrategyContext, resources: Resources | None = None) -> None:
        super().__init__(ctx)
        if resources is None:
            raise ValueError("strategy 'draft' needs a draft model: start the server with --draft-model PATH")
        check_vocabulary(ctx, resources)
        self.runner = ctx.runner(resources.weights, ctx.add_pool(*resources.kv_shape))
        self.k = AdaptiveK(self.name, ctx.config.num_speculative_tokens)
        self.cost = CostModel()

    def parse_params(self, params: dict) -> dict:
        return parse_k_params(self.name, params)

    def begin_step(self, stats: StepStats) -> None:
        self.k.begin_step(stats)

    def draft_cost(self) -> float:
        fixed, per_token = self.cost.fit()
        return per_token + fixed / self.k.num_candidates

    def state(self, seq: Sequence) -> DraftState:
        if seq.strategy_state is None:
            seq.strategy_state = DraftState()
        return seq.strategy_state

    def lookahead(self, seq: Sequence) -> int:
        ev = seq.strategy_state or DraftState()
        return self.k.draft_length(seq, ev, self.ctx.max_model_len, self.draft_cost())

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        plans = draft_chains(self.ctx, self, seqs, budgets)
        self.k.drafting |= any(p.drafts for p in plans)
        return plans

    def draft_plan(self, seq: Sequence, depth: int, drafted: list[int], carry) -> Plan:
        """The tokens `seq` feeds the drafter at `depth`: first every token it has not seen, then the
        chain's last drafted token."""
        st = self.state(seq)
        if depth == 0:
            plan = Plan(seq, seq.token_ids[st.computed :], start=st.computed)
        else:
            plan = Plan(seq, [drafted[-1]], start=seq.num_tokens + depth - 1)
        st.computed = plan.start + len(plan.tokens)
        return plan

    def draft_forward(self, plans: list[Plan]) -> tuple[torch.Tensor, list]:
        """(logits of each plan's last token, what each chain carries to the next depth)."""
        return self.runner.forward(plans).logits, [None] * len(plans)

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        verdicts = verify_chains(self.ctx, plans, out)
        for p, v in zip(plans, verdicts, strict=True):
            st = self.state(p.seq)
            if p.drafts:
                self.k.observe(st, len(p.drafts), len(v.tokens) - 1)
            # the draft's K/V stays valid up to the first token the target did not keep
            st.computed = min(st.computed, p.start + len(v.kv_keep))
        return verdicts


def check_vocabulary(ctx: StrategyContext, resources: Resources) -> None:
    """Refuse a draft model whose token ids mean something else than the target's."""
    vocab = resources.weights.get_output_embeddings().weight.shape[0]
    if vocab != ctx.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary has {vocab} tokens, the target's {ctx.vocab_size}: "
            "a draft model must share the target's tokenizer"
        )
    try:
        draft_vocab = load_tokenizer(resources.path).get_vocab()
    except (OSError, ValueError):  # weights without a tokenizer: the sizes matched, trust them
        return
    if draft_vocab != ctx.tokenizer.get_vocab():
        raise ValueError("the draft model's tokenizer differs from the target's: token ids would not match")
