"""Packs a step's plans into one ragged [1, T] batch and runs one forward of a model over the paged cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from branchwise.kernels import backend
from branchwise.kernels.metadata import AttentionMetadata, build_metadata
from branchwise.models.attention import StepContext
from branchwise.models.loader import decoder_of
from branchwise.strategies.base import Plan

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
GRAPH_MAX_QUERY = 16  # a step is decode-shaped when no sequence feeds more tokens than this
GRAPH_MASK_SLOTS = 64  # custom-mask entries per token the graph buffers hold


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
        self.graphs: CudaGraphs | None = None

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

    def run_decoder(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """(T, H) final-normed hidden states of the packed batch (eager)."""
        return self.decoder(
            input_ids=ids[None],
            position_ids=meta.positions[None],
            use_cache=False,
            branchwise_step=StepContext(self.pool, meta),
        ).last_hidden_state[0]

    @torch.inference_mode()
    def forward(self, plans: list[Plan]) -> ForwardOutput:
        ids, meta, logit_idx = self.prepare(plans)
        hidden_all = self.graphs.replay(ids, meta) if self.graphs is not None else None
        if hidden_all is None:
            hidden_all = self.run_decoder(ids, meta)
        hidden = hidden_all[logit_idx]
        return ForwardOutput(self.lm_head(hidden).float(), hidden, hidden_all, meta)

    def capture_graphs(self, max_tokens: int, max_blocks_per_seq: int) -> None:
        """Capture decode-shaped forwards (CUDA + Triton attention only)."""
        if self.device.type != "cuda" or backend(self.device) != "triton":
            return
        try:
            self.graphs = CudaGraphs(self, max_tokens, max_blocks_per_seq)
        except Exception:  # e.g. a model torch.compile cannot trace: graphs of the eager forward still help
            log.exception("torch.compile of the decoder failed; capturing graphs of the uncompiled forward")
            torch._dynamo.reset()
            self.graphs = CudaGraphs(self, max_tokens, max_blocks_per_seq, compile_backend=None)


class CudaGraphs:
    """Captured decoder forwards for T-token buckets, replayed for any decode-shaped step of <= T tokens.

    The attention kernels run in token tiles under a graph (one program per token, fixed split-K), so the
    captured launch configuration depends only on T: any mix of sequences fits, each reading its block
    table through static metadata buffers. The step is padded to the bucket with tokens of a dummy sequence
    of length 0: they write no K/V (slot -1) and attend to nothing.
    """

    def __init__(
        self,
        runner: ModelRunner,
        max_tokens: int,
        max_blocks_per_seq: int,
        capture: bool = True,
        compile_backend: str | None = "inductor",
    ) -> None:
        self.runner = runner
        self.capture = capture  # False: the same static-buffer forward, eager (tests it on CPU)
        # torch.compile fuses HF's many small elementwise kernels (norms, RoPE, residuals); without it a
        # captured decode step is bound by ~30 tiny kernels per layer, not by reading the weights
        self.forward = runner.run_decoder
        if compile_backend:
            self.forward = torch.compile(
                runner.run_decoder, backend=compile_backend, fullgraph=True, dynamic=True
            )
        self.buckets = [b for b in GRAPH_BUCKETS if b <= max_tokens]
        T = self.buckets[-1]
        dev = runner.device
        i32 = dict(dtype=torch.int32, device=dev)
        self.ids = torch.zeros(T, dtype=torch.long, device=dev)
        self.positions = torch.zeros(T, dtype=torch.long, device=dev)
        self.slots = torch.full((T,), -1, dtype=torch.long, device=dev)
        self.token_seqs = torch.zeros(T, **i32)
        self.token_index = torch.arange(T, **i32)
        self.query_start = torch.zeros(T + 2, **i32)
        self.seq_lens = torch.zeros(T + 1, **i32)
        self.block_tables = torch.zeros(T + 1, max_blocks_per_seq, **i32)
        self.mask_offsets = torch.full((T + 1,), -1, **i32)
        self.custom_mask = torch.zeros(T * GRAPH_MASK_SLOTS, dtype=torch.bool, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.metas: dict[int, AttentionMetadata] = {}
        pool = None
        for bucket in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            meta = self._meta(bucket)
            self.metas[bucket] = meta
            if not capture:
                continue
            self._fill_padding(0, 0, bucket)
            self.forward(self.ids[:bucket], meta)  # warm-up: compiles the decoder and the Triton kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(self.ids[:bucket], meta)
            pool = graph.pool()
            self.graphs[bucket] = (graph, hidden)
        log.info("captured CUDA graphs for %d buckets up to %d tokens", len(self.buckets), T)

    def _meta(self, bucket: int) -> AttentionMetadata:
        programs = bucket * self.runner.pool.shape[4]
        dev = self.runner.device
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        splits = 1 << max(0, min(4, (2 * sms // max(programs, 1)).bit_length() - 1))
        return AttentionMetadata(
            slot_mapping=self.slots[:bucket],
            positions=self.positions[:bucket],
            query_start=self.query_start,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            mask_offsets=self.mask_offsets,
            custom_mask=self.custom_mask,
            token_seqs=self.token_seqs[:bucket],
            token_index=self.token_index[:bucket],
            block_size=self.runner.block_size,
            max_query_len=1,
            max_seq_len=0,
            query_start_host=[],
            seq_lens_host=[],
            mask_offsets_host=[],
            graph_splits=splits,
        )

    def _fill_padding(self, n: int, num_seqs: int, bucket: int) -> None:
        """Tokens n..bucket belong to a dummy sequence `num_seqs` of length 0."""
        self.ids[n:bucket] = 0
        self.positions[n:bucket] = 0
        self.slots[n:bucket] = -1
        self.token_seqs[n:bucket] = num_seqs
        self.query_start[num_seqs + 1] = bucket
        self.seq_lens[num_seqs] = 0
        self.mask_offsets[num_seqs] = -1

    def replay(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """Hidden states (T, H) from a captured graph, or None if this step is not decode-shaped."""
        n, B = ids.shape[0], meta.num_seqs
        bucket = next((b for b in self.buckets if b >= n), None)
        width = meta.block_tables.shape[1]
        if (
            bucket is None
            or meta.max_query_len > GRAPH_MAX_QUERY
            or width > self.block_tables.shape[1]
            or meta.custom_mask.shape[0] > self.custom_mask.shape[0]
        ):
            return None
        self.ids[:n] = ids
        self.positions[:n] = meta.positions
        self.slots[:n] = meta.slot_mapping
        self.token_seqs[:n] = meta.token_seqs
        self.query_start[: B + 1] = meta.query_start
        self.seq_lens[:B] = meta.seq_lens
        self.block_tables[:B, :width] = meta.block_tables
        self.mask_offsets[:B] = meta.mask_offsets
        self.custom_mask[: meta.custom_mask.shape[0]] = meta.custom_mask
        self._fill_padding(n, B, bucket)
        if not self.capture:
            return self.forward(self.ids[:bucket], self.metas[bucket])[:n]
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:n]
