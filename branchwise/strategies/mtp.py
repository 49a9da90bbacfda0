"""Speculative decoding with a multi-token-prediction module (DeepSeek-V3) as the drafter.

The module drafts from the target's own hidden states: each target forward hands the strategy the hidden
state of every fed token (`on_forward`), kept until the next drafting step, where the module catches up on
every position it has not seen (one entry per position, in its one-layer K/V pool addressed by the
target's block tables) and drafts the first token; re-applied on its own output it drafts the rest of the
chain. The drafting loop (`draft.draft_chains`), verification (the chain rule of `base.py`), constraints
and adaptive K (`speculative.AdaptiveK`) are the draft model's: only where the drafter's inputs come from
differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from branchwise.engine.model_runner import pack, to_device
from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.sequence import Sequence
from branchwise.engine.stats import CostModel, StepStats
from branchwise.models.attention import ATTENTION_NAME, StepContext
from branchwise.models.loader import kv_shape
from branchwise.models.mtp import find_mtp, load_mtp
from branchwise.strategies.base import Resources, Strategy, verify_chains
from branchwise.strategies.draft import draft_chains
from branchwise.strategies.speculative import Acceptance, AdaptiveK, parse_k_params

if TYPE_CHECKING:
    from branchwise.engine.context import StrategyContext


@dataclass
class MTPState(Acceptance):
    computed: int = 0  # module entries 0..computed-1 are in its K/V
    first: int = -1  # position of the first kept target hidden row
    hidden: list[torch.Tensor] = field(default_factory=list)  # the target's hidden rows from `first` on
    held: int = 0  # how many rows `hidden` holds (counted: a sequence that does not draft keeps adding)
    first_block: int = 0  # the module attends to its entries from this block on
    hashes: list[int] = field(default_factory=list)  # chain hashes of the sequence's full blocks' prefixes
    marked: int = 0  # blocks whose entries are registered in `written`


class MTPStrategy(Strategy):
    name = "mtp"
    needs = (
        "strategy 'mtp' needs an MTP module: a checkpoint with an MTP layer, `mtp.safetensors` beside the "
        "model (`branchwise train mtp`), or --mtp-model FILE"
    )

    @classmethod
    def resources(cls, config, model_path, model, dtype, device) -> Resources | None:
        found = find_mtp(model_path, config.mtp_model)
        if found is None:
            return None
        _, kv_heads, head_dim = kv_shape(model)
        return Resources(load_mtp(model, *found), (1, kv_heads, head_dim), found[0])

    def __init__(self, ctx: StrategyContext, resources: Resources | None = None) -> None:
        super().__init__(ctx)
        if resources is None:
            raise ValueError(self.needs)
        self.module = resources.weights
        self.module.set_attention(ATTENTION_NAME)
        self.module.fuse()
        self.pool = ctx.add_pool(*resources.kv_shape)
        self.feature_width = ctx.model_config.hidden_size  # of the target rows the module reads
        self.k = AdaptiveK(self.name, ctx.config.num_speculative_tokens)
        self.cost = CostModel()
        # block id -> hash of the token prefix its module entries were written for: a prefix-cache hit
        # may reuse a block's entries only if they belong to the same prefix (a block computed by a
        # request of another strategy has none)
        self.written: dict[int, int] = {}

    def parse_params(self, params: dict) -> dict:
        return parse_k_params(self.name, params)

    def begin_step(self, stats: StepStats) -> None:
        self.k.begin_step(stats)

    def draft_cost(self) -> float:
        fixed, per_token = self.cost.fit()
        return per_token + fixed / self.k.num_candidates

    def lookahead(self, seq: Sequence) -> int:
        ev = seq.strategy_state or MTPState()
        return self.k.draft_length(seq, ev, self.ctx.max_model_len, self.draft_cost())

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        plans = draft_chains(self.ctx, self, seqs, budgets)
        self.k.drafting |= any(p.drafts for p in plans)
        return plans

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        verdicts = verify_chains(self.ctx, plans, out)
        for p, v in zip(plans, verdicts, strict=True):
            st = self.state(p.seq)
            if p.drafts:
                self.k.observe(st, len(p.drafts), len(v.tokens) - 1)
            st.computed = min(st.computed, p.start + len(v.kv_keep))
        return verdicts

    def state(self, seq: Sequence) -> MTPState:
        if seq.strategy_state is None:
            seq.strategy_state = MTPState()
            self._restart(seq.strategy_state, 0)
        return seq.strategy_state

    def _restart(self, st: MTPState, position: int, first_block: int = 0) -> None:
        """Entries from `position` on are missing; the target hidden state before it is unknown (zeros);
        the module attends to its entries from `first_block` on."""
        st.computed = position
        st.first = position - 1
        st.hidden = [torch.zeros(1, self.feature_width, dtype=self.ctx.dtype, device=self.ctx.device)]
        st.held = 1
        st.first_block = first_block
        st.marked = max(first_block, position // self.ctx.block_size)

    def _hashes(self, seq: Sequence, st: MTPState, count: int) -> list[int]:
        bs, hashes = self.ctx.block_size, st.hashes
        while len(hashes) < count:
            b = len(hashes)
            hashes.append(hash((hashes[-1] if hashes else 0, *seq.token_ids[b * bs : (b + 1) * bs])))
        return hashes

    def _reused_from(self, seq: Sequence, st: MTPState, position: int) -> int:
        """After a prefix-cache hit up to `position`: the first block of the longest run of cached blocks,
        ending at the hit, that hold module entries of this very prefix."""
        count = position // self.ctx.block_size
        hashes = self._hashes(seq, st, count)
        first = count
        while first > 0 and self.written.get(seq.block_table[first - 1]) == hashes[first - 1]:
            first -= 1
        return first

    def on_forward(self, plans: list[Plan], out: ForwardOutput) -> None:
        """Keep the target's hidden state of every fed position for the module's next catch-up."""
        for p, row in zip(plans, out.token_rows, strict=True):
            st = self.state(p.seq)
            have = st.first + st.held
            if st.first > p.start or have < p.start:  # a gap: a prefix-cache hit, a forked sibling
                self._restart(st, p.start, self._reused_from(p.seq, st, p.start))
            elif have > p.start:  # rows of tokens the target did not keep (rejected drafts)
                rows = torch.cat(st.hidden)[: p.start - st.first]
                st.hidden, st.held = [rows], len(rows)
            # a new list: an isolated retry restores the state it saved, list included
            st.hidden = [*st.hidden, self.features(out)[row : row + len(p.tokens)].clone()]
            st.held += len(p.tokens)

    def features(self, out: ForwardOutput) -> torch.Tensor:
        """(T, feature_width) what the module reads of every fed token: the final-normed hidden state."""
        return out.hidden_all

    def draft_plan(self, seq: Sequence, depth: int, drafted: list[int], carry) -> Plan:
        st = self.state(seq)
        first_block, bs = st.first_block, self.ctx.block_size
        if depth:  # the module again, on its own last output and the token it drafted
            start = seq.num_tokens + depth - 1
            self.written.pop(seq.block_table[start // bs], None)
            return Plan(seq, [drafted[-1]], start=start, payload=carry[None], first_block=first_block)
        # entries computed..num_computed: token j with the target's hidden state of position j - 1
        rows = torch.cat(st.hidden)[: seq.num_computed - st.first]
        if len(rows) != seq.num_computed - st.first:  # hidden states missing: draft from here on
            self._restart(st, seq.num_computed)
            rows = st.hidden[0]
        tokens = seq.token_ids[st.computed : seq.num_computed + 1]
        plan = Plan(seq, tokens, start=st.computed, payload=rows, first_block=first_block)
        st.computed = seq.num_computed + 1
        st.first, st.hidden, st.held = seq.num_computed, [], 0
        full = seq.num_computed // bs  # blocks whose entries are now written
        hashes = self._hashes(seq, st, full)
        for b in range(st.marked, full):
            self.written[seq.block_table[b]] = hashes[b]
        st.marked = max(st.marked, full)
        self.written.pop(seq.block_table[full], None)  # partly written: no prefix's entries in full
        return plan

    @torch.inference_mode()
    def draft_forward(self, plans: list[Plan]) -> tuple[torch.Tensor, list]:
        bs = self.ctx.block_size
        packed = pack(plans, bs)
        ids, meta = to_device(packed, bs, self.ctx.device)
        hidden = torch.cat([p.payload for p in plans])
        x = self.module(ids, hidden, meta.positions, branchwise_step=StepContext(self.pool, meta))
        last = x[torch.from_numpy(packed.logit_idx).to(x.device)]
        return self.module.logits(last).float(), list(last)
