"""Packs a step's plans into one ragged [1, T] batch and runs one forward of a model over the paged cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from branchwise.kernels.metadata import AttentionMetadata, build_metadata
from branchwise.models.attention import StepContext
from branchwise.models.loader import decoder_of
from branchwise.strategies.base import Plan


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # (R, V) float32, rows of every plan's last num_logits tokens, plan by plan
    hidden: torch.Tensor  # (R, H) final-normed hidden states of the same rows
    hidden_all: torch.Tensor  # (T, H) of every fed token (MTP modules read them)
    meta: AttentionMetadata


class ModelRunner:
    """One model (target or draft) and its K/V pool; every pool shares the engine's block ids."""

    def __init__(
        self, model: torch.nn.Module, pool: torch.Tensor, block_size: int, device: torch.device
    ) -> None:
        self.model = model
        self.decoder = decoder_of(model)
        self.lm_head = model.get_output_embeddings()
        self.pool = pool
        self.block_size = block_size
        self.device = device

    def prepare(self, plans: list[Plan]) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input_ids (T,), metadata, logits_indices (R,)); sets each plan's logits_row."""
        tokens, positions, query_lens, seq_lens, tables, masks, logit_idx = [], [], [], [], [], [], []
        kv_index, owner = [], []
        t = r = 0
        for b, p in enumerate(plans):
            n = len(p.tokens)
            tokens += p.tokens
            kv_index.append(torch.arange(p.start, p.start + n))
            positions.append(kv_index[-1] if p.positions is None else torch.tensor(p.positions))
            owner.append(torch.full((n,), b))
            query_lens.append(n)
            seq_lens.append(p.start + n)
            tables.append(p.seq.block_table)
            masks.append(p.mask)
            p.logits_row = r
            logit_idx.append(torch.arange(t + n - p.num_logits, t + n))
            t, r = t + n, r + p.num_logits
        kv = torch.cat(kv_index)
        bs = self.block_size
        table_t = torch.zeros(len(plans), max(len(x) for x in tables), dtype=torch.long)
        for b, x in enumerate(tables):
            table_t[b, : len(x)] = torch.tensor(x)
        slots = table_t[torch.cat(owner), kv // bs] * bs + kv % bs
        meta = build_metadata(
            slots, torch.cat(positions), query_lens, seq_lens, table_t, masks, bs, self.device
        )
        ids = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
        return ids, meta, torch.cat(logit_idx).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def forward(self, plans: list[Plan]) -> ForwardOutput:
        ids, meta, logit_idx = self.prepare(plans)
        hidden_all = self.decoder(
            input_ids=ids[None],
            position_ids=meta.positions[None],
            use_cache=False,
            branchwise_step=StepContext(self.pool, meta),
        ).last_hidden_state[0]
        hidden = hidden_all[logit_idx]
        return ForwardOutput(self.lm_head(hidden).float(), hidden, hidden_all, meta)
