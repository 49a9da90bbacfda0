"""Speculative decoding with a multi-token-prediction module (DeepSeek-V3) as the drafter.

The module drafts from the target's own hidden states: each target forward hands the strategy the hidden
state of every fed token (`on_forward`), kept until the next drafting step, where the module catches up on
every position it has not seen (one entry per position, in its one-layer K/V pool addressed by the
target's block tables) and drafts the first token; re-applied on its own output it drafts the rest of the
chain. Drafting, verification (the chain rule of `base.py`), constraints and adaptive K are the draft
model's (`draft.py`): only where the drafter's inputs come from differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from branchwise.engine.kv_cache import new_pool
from branchwise.engine.model_runner import ForwardOutput, pack, to_device
from branchwise.engine.sequence import Sequence
from branchwise.models.attention import ATTENTION_NAME, StepContext
from branchwise.models.loader import kv_shape
from branchwise.strategies.base import Plan
from branchwise.strategies.draft import DraftStrategy
from branchwise.strategies.speculative import CostModel, SpeculativeStrategy

if TYPE_CHECKING:
    from branchwise.engine.engine import LLMEngine


class MTPStrategy(DraftStrategy):
    name = "mtp"

    def __init__(self, engine: LLMEngine) -> None:
        SpeculativeStrategy.__init__(self, engine)  # the draft loop, without a draft model
        if engine.mtp is None:
            raise ValueError(
                "strategy 'mtp' needs an MTP module: a checkpoint with an MTP layer, `mtp.safetensors` "
                "beside the model (`branchwise train mtp`), or --mtp-model FILE"
            )
        self.module = engine.mtp
        self.module.set_attention(ATTENTION_NAME)
        _, kv_heads, head_dim = kv_shape(engine.model)
        bs = engine.config.block_size
        self.pool = new_pool(1, engine.num_blocks, bs, kv_heads, head_dim, engine.dtype, engine.device)
        engine.blocks.pools.append(self.pool)  # copies and moves of blocks apply to its K/V too
        self.hidden_size = engine.model.config.hidden_size
        self.cost = CostModel()
        # block id -> hash of the token prefix its module entries were written for: a prefix-cache hit
        # may reuse a block's entries only if they belong to the same prefix (a block computed by a
        # request of another strategy has none)
        self.written: dict[int, int] = {}

    def state(self, seq: Sequence) -> dict:
        st = SpeculativeStrategy.state(self, seq)
        if "computed" not in st:  # module entries 0..computed-1 are in its K/V
            self._restart(st, 0)
        return st

    def _restart(self, st: dict, position: int, first_block: int = 0) -> None:
        """Entries from `position` on are missing; the target hidden state before it is unknown (zeros);
        the module attends to its entries from `first_block` on."""
        st["computed"] = position
        st["first"] = position - 1  # position of the first kept hidden row
        st["hidden"] = [torch.zeros(1, self.hidden_size, dtype=self.engine.dtype, device=self.engine.device)]
        st["first_block"] = first_block
        st.setdefault("hashes", [])  # chain hashes of the sequence's full blocks' token prefixes
        st["marked"] = max(first_block, position // self.engine.config.block_size)

    def _hashes(self, seq: Sequence, st: dict, count: int) -> list[int]:
        bs, hashes = self.engine.config.block_size, st["hashes"]
        while len(hashes) < count:
            b = len(hashes)
            hashes.append(hash((hashes[-1] if hashes else 0, *seq.token_ids[b * bs : (b + 1) * bs])))
        return hashes

    def _reused_from(self, seq: Sequence, st: dict, position: int) -> int:
        """After a prefix-cache hit up to `position`: the first block of the longest run of cached blocks,
        ending at the hit, that hold module entries of this very prefix."""
        count = position // self.engine.config.block_size
        hashes = self._hashes(seq, st, count)
        first = count
        while first > 0 and self.written.get(seq.block_table[first - 1]) == hashes[first - 1]:
            first -= 1
        return first

    def on_forward(self, plans: list[Plan], out: ForwardOutput) -> None:
        """Keep the target's hidden state of every fed position for the module's next catch-up."""
        for p in plans:
            st = self.state(p.seq)
            have = st["first"] + sum(len(h) for h in st["hidden"])
            if st["first"] > p.start or have < p.start:  # a gap: a prefix-cache hit, a forked sibling
                self._restart(st, p.start, self._reused_from(p.seq, st, p.start))
            elif have > p.start:  # rows of tokens the target did not keep (rejected drafts)
                rows = torch.cat(st["hidden"])[: p.start - st["first"]]
                st["hidden"] = [rows]
            st["hidden"].append(out.hidden_all[p.token_row : p.token_row + len(p.tokens)].clone())

    def draft_plan(self, seq: Sequence, depth: int, drafted: list[int], carry) -> Plan:
        st = self.state(seq)
        first_block = st["first_block"]
        if depth:  # the module again, on its own last output and the token it drafted
            start = seq.num_tokens + depth - 1
            self.written.pop(seq.block_table[start // self.engine.config.block_size], None)
            return Plan(seq, [drafted[-1]], start=start, payload=carry[None], first_block=first_block)
        # entries computed..num_computed: token j with the target's hidden state of position j - 1
        rows = torch.cat(st["hidden"])[: seq.num_computed - st["first"]]
        if len(rows) != seq.num_computed - st["first"]:  # hidden states missing: draft from here on
            self._restart(st, seq.num_computed)
            rows = st["hidden"][0]
        tokens = seq.token_ids[st["computed"] : seq.num_computed + 1]
        plan = Plan(seq, tokens, start=st["computed"], payload=rows, first_block=first_block)
        st["computed"] = seq.num_computed + 1
        st["first"], st["hidden"] = seq.num_computed, []
        full = seq.num_computed // self.engine.config.block_size  # blocks whose entries are now written
        hashes = self._hashes(seq, st, full)
        for b in range(st["marked"], full):
            self.written[seq.block_table[b]] = hashes[b]
        st["marked"] = max(st["marked"], full)
        self.written.pop(seq.block_table[full], None)  # partly written: no prefix's entries in full
        return plan

    @torch.inference_mode()
    def draft_forward(self, plans: list[Plan]) -> tuple[torch.Tensor, list]:
        bs = self.engine.config.block_size
        packed = pack(plans, bs)
        ids, meta = to_device(packed, bs, self.engine.device)
        hidden = torch.cat([p.payload for p in plans])
        x = self.module(ids, hidden, meta.positions, branchwise_step=StepContext(self.pool, meta))
        last = x[torch.from_numpy(packed.logit_idx).to(x.device)]
        return self.module.logits(last).float(), list(last)
