"""Speculative decoding with a small draft model (Leviathan et al. 2023; Chen et al. 2023).

The draft model has its own K/V pool addressed by the same block tables as the target's, so a sequence's
draft K/V lives in the same slots and every rollback of the target's (a truncation) rolls it back too.
Each step the draft first catches up on the tokens it has not seen (the prompt, the last step's accepted
and sampled tokens), then proposes one token per batched forward, K forwards for the deepest chain; the
target scores all drafts in the engine's one forward and the chain rule of `base.py` accepts a prefix.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from branchwise.constraints import unpack
from branchwise.engine import sampler
from branchwise.engine.kv_cache import new_pool
from branchwise.engine.model_runner import ForwardOutput, ModelRunner
from branchwise.engine.sequence import Sequence
from branchwise.models.loader import kv_shape, load_tokenizer
from branchwise.strategies.base import Plan, Verdict
from branchwise.strategies.speculative import CostModel, SpeculativeStrategy

if TYPE_CHECKING:
    from branchwise.engine.engine import LLMEngine


class DraftStrategy(SpeculativeStrategy):
    name = "draft"

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine)
        model = engine.draft_model
        if model is None:
            raise ValueError("strategy 'draft' needs a draft model: start the server with --draft-model PATH")
        check_vocabulary(engine, model)
        layers, kv_heads, head_dim = kv_shape(model)
        bs = engine.config.block_size
        pool = new_pool(layers, engine.num_blocks, bs, kv_heads, head_dim, engine.dtype, engine.device)
        engine.blocks.pools.append(pool)  # copies and moves of blocks apply to both caches
        self.runner = ModelRunner(model, pool, bs, engine.device)
        if not engine.config.enforce_eager:
            self.runner.capture_graphs(engine.config.max_num_batched_tokens, -(-engine.max_model_len // bs))
        self.cost = CostModel()

    def draft_cost(self) -> float:
        fixed, per_token = self.cost.fit()
        return per_token + fixed / self.num_candidates

    def state(self, seq: Sequence) -> dict:
        st = super().state(seq)
        st.setdefault("computed", 0)  # tokens whose draft K/V is in the cache
        return st

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        want = [b - 1 for b in budgets]
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [i for i, k in enumerate(want) if k > 0]
        consumed = [0] * len(seqs)  # drafted tokens each matcher advanced through
        carry: list = [None] * len(seqs)  # what a drafter passes from one depth to the next
        try:  # the matchers advance through the drafts; they roll back even if drafting fails
            for depth in range(max((want[i] for i in active), default=0)):
                idx = [i for i in active if want[i] > depth]
                if not idx:  # every chain still going has met the end of its grammar
                    break
                plans = [self.draft_plan(seqs[i], depth, drafts[i], carry[i]) for i in idx]
                started = time.perf_counter()
                logits, carried = self.draft_forward(plans)
                for j, i in enumerate(idx):
                    carry[i] = carried[j]
                group = [seqs[i] for i in idx]
                if any(s.params.logit_bias for s in group):  # the bias moves the target: the draft too
                    logits = logits + sampler.logit_bias(group, logits.shape[-1], logits.device)
                if any(s.matcher is not None for s in group):  # draft only what the grammar allows
                    logits = self._mask(logits, group)
                q = sampler.target_probs(logits[:, None], group)[:, 0]
                u = torch.tensor(
                    [0.5 if s.params.greedy else float(torch.rand(1, generator=s.generator)) for s in group]
                )
                tokens = sampler.sample_from(q, u.to(q.device)).tolist()
                self.cost.observe(sum(len(p.tokens) for p in plans), time.perf_counter() - started)
                for j, i in enumerate(idx):
                    drafts[i].append(tokens[j])
                    probs[i].append(q[j])
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
        for seq, d, q in zip(seqs, drafts, probs, strict=True):
            pending = seq.token_ids[seq.num_computed :]
            # a greedy draft is deterministic: the chain rule then needs no q (a point mass)
            q_t = torch.stack(q) if d and not seq.params.greedy else None
            plans.append(Plan(seq, pending + d, num_logits=len(d) + 1, drafts=d, draft_probs=q_t))
        return plans

    def draft_plan(self, seq: Sequence, depth: int, drafted: list[int], carry) -> Plan:
        """The tokens `seq` feeds the drafter at `depth`: first every token it has not seen, then the
        chain's last drafted token."""
        st = self.state(seq)
        if depth == 0:
            plan = Plan(seq, seq.token_ids[st["computed"] :], start=st["computed"])
        else:
            plan = Plan(seq, [drafted[-1]], start=seq.num_tokens + depth - 1)
        st["computed"] = plan.start + len(plan.tokens)
        return plan

    def draft_forward(self, plans: list[Plan]) -> tuple[torch.Tensor, list]:
        """(logits of each plan's last token, what each chain carries to the next depth)."""
        return self.runner.forward(plans).logits, [None] * len(plans)

    def _mask(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        constrained = [j for j, s in enumerate(seqs) if s.matcher is not None]
        bitmask = self.engine.grammars().masks(
            [seqs[j].matcher for j in constrained], [[]] * len(constrained)
        )
        allowed = torch.ones_like(logits, dtype=torch.bool)
        allowed[constrained] = unpack(bitmask, logits.shape[-1], logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        verdicts = super().verify(plans, out)
        for p, v in zip(plans, verdicts, strict=True):
            # the draft's K/V stays valid up to the first token the target did not keep
            st = self.state(p.seq)
            st["computed"] = min(st["computed"], p.start + len(v.kv_keep))
        return verdicts


def check_vocabulary(engine: LLMEngine, model: torch.nn.Module) -> None:
    """Refuse a draft model whose token ids mean something else than the target's."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab != engine.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary has {vocab} tokens, the target's {engine.vocab_size}: "
            "a draft model must share the target's tokenizer"
        )
    try:
        draft_vocab = load_tokenizer(engine.draft_path).get_vocab()
    except (OSError, ValueError):  # weights without a tokenizer: the sizes matched, trust them
        return
    if draft_vocab != engine.tokenizer.get_vocab():
        raise ValueError("the draft model's tokenizer differs from the target's: token ids would not match")
