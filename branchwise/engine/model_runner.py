"""Packs a step's plans into one ragged [1, T] batch and runs one forward of a model over the paged cache."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from branchwise import kernels
from branchwise.engine.plan import ForwardOutput, Plan
from branchwise.kernels import LINEAR_CONFIGS, backend
from branchwise.kernels.metadata import AttentionMetadata, build_metadata
from branchwise.models.attention import StepContext
from branchwise.models.fused import fused_forward, fused_weights, is_fused
from branchwise.models.loader import decoder_of

log = logging.getLogger(__name__)

# no 1-token bucket: a size-1 dimension would be compiled separately; 1 token runs padded to 2
GRAPH_BUCKETS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
GRAPH_MAX_QUERY = 16  # a step is decode-shaped when no sequence feeds more tokens than this
GRAPH_MASK_SLOTS = 64  # custom-mask entries per token the graph buffers hold


Fill = tuple[torch.Tensor, torch.Tensor]  # (rows of the packed ids, token ids on the device) to write there


@dataclass
class Packed:
    """A step's ragged batch on the host, before it reaches the device."""

    ids: np.ndarray  # (T,) token ids
    positions: np.ndarray  # (T,)
    slots: np.ndarray  # (T,) cache slot of each token
    owner: np.ndarray  # (T,) index of each token's plan
    query_start: np.ndarray  # (B+1,)
    seq_lens: np.ndarray  # (B,) KV length after the step
    tables: np.ndarray  # (B, W) block tables, padded with 0
    masks: list[torch.Tensor | None]
    logit_idx: np.ndarray  # (R,) rows whose logits are wanted
    logits_start: np.ndarray  # (B,) each plan's first row among them
    decode: bool = False  # one token per plan, no masks (`_pack_decode`'s)

    @property
    def max_query_len(self) -> int:
        return int(np.diff(self.query_start).max())


def pack(plans: list[Plan], block_size: int) -> Packed:
    """The plans as host arrays (the plans are only read)."""
    if all(len(p.tokens) == p.num_logits == 1 and p.positions is None and not p.first_block for p in plans):
        return _pack_decode(plans, block_size)
    lens = np.array([len(p.tokens) for p in plans])
    query_start = np.concatenate([[0], np.cumsum(lens)])
    owner = np.repeat(np.arange(len(plans)), lens)
    skipped = np.array([p.first_block * block_size for p in plans])  # K/V before it is not attended
    starts = np.array([p.start for p in plans]) - skipped
    kv = np.arange(query_start[-1]) - query_start[owner] + starts[owner]
    tables = np.zeros(
        (len(plans), max(len(p.seq.block_table) - p.first_block for p in plans)), dtype=np.int64
    )
    positions = kv + (skipped + np.array([p.seq.position_offset for p in plans]))[owner]
    num_logits = np.array([p.num_logits for p in plans])
    logits_start = np.cumsum(num_logits) - num_logits
    # each plan's last num_logits tokens, plan by plan
    logit_owner = np.repeat(np.arange(len(plans)), num_logits)
    first_logit = query_start[1:] - num_logits
    logit_idx = np.arange(num_logits.sum()) - logits_start[logit_owner] + first_logit[logit_owner]
    for b, p in enumerate(plans):
        tables[b, : len(p.seq.block_table) - p.first_block] = p.seq.block_table[p.first_block :]
        if p.positions is not None:
            positions[query_start[b] : query_start[b + 1]] = p.positions
    return Packed(
        ids=np.fromiter((t for p in plans for t in p.tokens), dtype=np.int64, count=int(query_start[-1])),
        positions=positions,
        slots=tables[owner, kv // block_size] * block_size + kv % block_size,
        owner=owner,
        query_start=query_start,
        seq_lens=starts + lens,
        tables=tables,
        masks=[p.mask for p in plans],
        logit_idx=logit_idx,
        logits_start=logits_start,
    )


def _pack_decode(plans: list[Plan], block_size: int) -> Packed:
    """`pack` of plans that feed one token each, at its own position, with its logits (decode steps, a
    drafter's chain): the same arrays in a few numpy calls (every step and every drafting depth pays them)."""
    B = len(plans)
    index = np.arange(B)
    starts = np.fromiter((p.start for p in plans), np.int64, B)
    widths = [len(p.seq.block_table) for p in plans]
    if min(widths) == max(widths):  # one flat read (sequences that started together grow together)
        flat = itertools.chain.from_iterable([p.seq.block_table for p in plans])
        tables = np.fromiter(flat, np.int64, B * widths[0]).reshape(B, widths[0])
    else:
        tables = np.zeros((B, max(widths)), dtype=np.int64)
        for b, p in enumerate(plans):
            tables[b, : len(p.seq.block_table)] = p.seq.block_table
    offsets = [p.seq.position_offset for p in plans]
    return Packed(
        ids=np.fromiter((p.tokens[0] for p in plans), np.int64, B),
        positions=starts + np.array(offsets) if any(offsets) else starts,
        slots=tables[index, starts // block_size] * block_size + starts % block_size,
        owner=index,
        query_start=np.arange(B + 1),
        seq_lens=starts + 1,
        tables=tables,
        masks=[p.mask for p in plans],
        logit_idx=index,
        logits_start=index,
        decode=all(p.mask is None for p in plans),
    )


def to_device(
    packed: Packed, block_size: int, device: torch.device
) -> tuple[torch.Tensor, AttentionMetadata]:
    """(input_ids, metadata) on the device for an eager forward."""
    meta = build_metadata(
        packed.slots,
        packed.positions,
        None if packed.decode else np.diff(packed.query_start),
        packed.seq_lens,
        torch.from_numpy(packed.tables),
        packed.masks,
        block_size,
        device,
    )
    ids = torch.from_numpy(packed.ids)
    return (ids if device.type == "cpu" else ids.to(device, non_blocking=True)), meta


class ModelRunner:
    """One model (target or draft) and its K/V pool; every pool shares the engine's block ids."""

    def __init__(
        self, model: torch.nn.Module, pool: torch.Tensor, block_size: int, device: torch.device
    ) -> None:
        self.model = model
        self.decoder = decoder_of(model)
        self.lm_head = model.get_output_embeddings()
        self.pool = pool
        self.layer_caches = [(pool[i, 0], pool[i, 1]) for i in range(pool.shape[0])]
        self.block_size = block_size
        self.device = device
        self.graphs: CudaGraphs | None = None
        self.aux: torch.Tensor | None = None  # (max tokens, k H) what `capture` keeps, rewritten each forward
        self.aux_layers: tuple[int, ...] = ()
        self.fused = is_fused(self.decoder)  # our lean forward of HF's math, else HF's own forward

    def capture(self, layers: list[int], max_tokens: int) -> None:
        """Keep the residual stream entering each of `layers` (the previous layer's output), side by side,
        in one preallocated buffer that every forward overwrites: no second forward, fixed addresses for
        CUDA graphs (capture before `capture_graphs`)."""
        hidden = self.model.config.hidden_size
        param = next(self.model.parameters())
        rows = max(max_tokens, GRAPH_BUCKETS[-1])
        self.aux = torch.zeros(rows, len(layers) * hidden, dtype=param.dtype, device=param.device)
        self.aux_layers = tuple(layers)  # the fused forward copies them itself; HF's forward needs hooks
        for k, i in enumerate(layers if not self.fused else []):

            def keep(module, args, kwargs, k=k) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                self.aux[: x.shape[-2], k * hidden : (k + 1) * hidden].copy_(x[0])

            self.decoder.layers[i].register_forward_pre_hook(keep, with_kwargs=True)
        if self.graphs is not None:  # captured without the hooks: again with them, compiled afresh
            self.graphs = None
            torch._dynamo.reset()  # dynamo does not guard on hooks added after compiling
            self.capture_graphs(*self.graph_args)

    def pack(self, plans: list[Plan]) -> Packed:
        return pack(plans, self.block_size)

    def metadata(self, packed: Packed) -> tuple[torch.Tensor, AttentionMetadata]:
        return to_device(packed, self.block_size, self.device)

    def run_decoder(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """(T, H) final-normed hidden states of the packed batch (eager)."""
        step = StepContext(self.pool, meta, self.layer_caches)
        if self.fused:
            return fused_forward(self.decoder, ids, meta.positions, step, self.aux, self.aux_layers)
        return self.decoder(
            input_ids=ids[None], position_ids=meta.positions[None], use_cache=False, branchwise_step=step
        ).last_hidden_state[0]

    def decode(self, packed: Packed, fill: Fill | None = None) -> torch.Tensor:
        """(T, H) hidden states of a packed batch: a captured graph where one fits, else eager."""
        hidden_all = self.graphs.replay(packed, fill) if self.graphs is not None else None
        if hidden_all is not None:
            return hidden_all
        ids, meta = self.metadata(packed)
        if fill is not None:
            ids[fill[0]] = fill[1]
        return self.run_decoder(ids, meta)

    @torch.inference_mode()
    def forward(self, plans: list[Plan], placed: torch.Tensor | None = None) -> ForwardOutput:
        """One forward over the plans. A negative token -(1 + i) is a placeholder (async scheduling): the
        forward reads it from placed[i], a token the previous step sampled that is still on the device."""
        packed = self.pack(plans)
        fill = None
        if placed is not None and (at := np.flatnonzero(packed.ids < 0)).size:
            source = torch.from_numpy(-1 - packed.ids[at]).to(placed.device, non_blocking=True)
            fill = (torch.from_numpy(at).to(self.device, non_blocking=True), placed[source])
            packed.ids[at] = 0
        hidden_all = self.decode(packed, fill)
        if len(packed.logit_idx) == len(packed.ids):  # every row (decode steps): no gather
            hidden = hidden_all
        else:
            hidden = hidden_all[torch.from_numpy(packed.logit_idx).to(self.device, non_blocking=True)]
        rows, tokens = packed.logits_start.tolist(), packed.query_start[:-1].tolist()
        aux = self.aux[: len(packed.ids)] if self.aux is not None else None
        return ForwardOutput(self.logits(hidden), hidden, hidden_all, rows, tokens, aux)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, V) float32 logits of final-normed hidden states (the head GEMM via `kernels.linear`)."""
        head = self.lm_head
        if type(head) is torch.nn.Linear:
            return kernels.linear(hidden, head.weight, head.bias).float()
        return head(hidden).float()

    def capture_graphs(self, max_tokens: int, max_blocks_per_seq: int) -> None:
        """Capture decode-shaped forwards (CUDA + Triton attention only)."""
        self.graph_args = (max_tokens, max_blocks_per_seq)
        if self.device.type != "cuda" or backend(self.device) != "triton":
            return
        weights = fused_weights(self.model)
        if type(self.lm_head) is torch.nn.Linear:
            weights.append(self.lm_head.weight)
        weights = [w for w in weights if (*w.shape, w.dtype) not in LINEAR_CONFIGS]
        if weights:  # before compiling: the decoder's graph bakes in which GEMM each shape takes
            from branchwise.kernels import triton_linear

            LINEAR_CONFIGS.update(triton_linear.tune(weights))
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
    table through static metadata. The step is padded to the bucket with tokens of a dummy sequence of
    length 0: they write no K/V (slot -1) and attend to nothing. All int metadata lives in one pinned host
    buffer mirrored by one device buffer, so a replay costs one host-to-device copy.
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
        self.buckets = [b for b in GRAPH_BUCKETS if b <= max_tokens] or [GRAPH_BUCKETS[0]]
        T, W = self.buckets[-1], max_blocks_per_seq
        self.width = W
        dev = runner.device
        # one int32 buffer: ids | positions | slots | token_seqs | query_start | seq_lens | mask_offsets |
        # block tables
        sizes = [T, T, T, T, T + 2, T + 1, T + 1, (T + 1) * W]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.host = torch.zeros(int(self.offsets[-1]), dtype=torch.int32)
        if dev.type == "cuda":
            self.host = self.host.pin_memory()
        self.host_np = self.host.numpy()
        self.dev = torch.zeros_like(self.host, device=dev)
        self.copied = torch.cuda.Event() if dev.type == "cuda" else None
        views = [self.dev[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]
        self.ids, self.positions, self.slots, self.token_seqs, self.query_start, self.seq_lens = views[:6]
        self.mask_offsets, self.block_tables = views[6], views[7].view(T + 1, W)
        self.token_index = torch.arange(T, dtype=torch.int32, device=dev)
        self.custom_mask = torch.zeros(T * GRAPH_MASK_SLOTS, dtype=torch.bool, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.metas = {bucket: self._meta(bucket) for bucket in self.buckets}
        pool = None
        for bucket in reversed(self.buckets) if capture else []:  # largest first: smaller ones reuse its pool
            self._stage(None, bucket)
            self.forward(self.ids[:bucket], self.metas[bucket])  # warm-up: compiles decoder and kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(self.ids[:bucket], self.metas[bucket])
            pool = graph.pool()
            self.graphs[bucket] = (graph, hidden)
        if capture:
            log.info("captured CUDA graphs for %d buckets up to %d tokens", len(self.buckets), T)

    def _meta(self, bucket: int) -> AttentionMetadata:
        # two split-K settings only: every distinct one is another compilation of the decoder
        splits = 8 if bucket <= 16 else 1
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
            backend="triton",  # graphs are captured for the Triton kernels only
        )

    def _stage(self, packed: Packed | None, bucket: int) -> None:
        """Write the step (or nothing) + padding into the host buffer and copy it to the device at once."""
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the pinned buffer
        h, o = self.host_np, self.offsets
        n, B = (0, 0) if packed is None else (len(packed.ids), len(packed.seq_lens))
        ids, pos, slots, seqs, qstart, lens, moff, tables = (h[o[i] : o[i + 1]] for i in range(8))
        tables = tables.reshape(-1, self.width)
        if packed is not None:
            ids[:n], pos[:n], slots[:n], seqs[:n] = packed.ids, packed.positions, packed.slots, packed.owner
            qstart[: B + 1], lens[:B] = packed.query_start, packed.seq_lens
            tables[:B, : packed.tables.shape[1]] = packed.tables
            offsets, used, flat = [], 0, []
            for mask in packed.masks:
                if mask is not None:
                    offsets.append(used)
                    flat.append(mask.reshape(-1))
                    used += mask.numel()
                else:
                    offsets.append(-1)
            moff[:B] = offsets
            if flat:
                self.custom_mask[:used].copy_(torch.cat(flat), non_blocking=True)
        ids[n:bucket], pos[n:bucket], slots[n:bucket], seqs[n:bucket] = 0, 0, -1, B
        qstart[B + 1], lens[B], moff[B] = bucket, 0, -1  # the padding's dummy sequence: length 0
        end = int(o[7]) + (B + 1) * self.width
        self.dev[:end].copy_(self.host[:end], non_blocking=True)
        if self.copied is not None:  # the next step may stage before this one's logits are read (async)
            self.copied.record()

    def replay(self, packed: Packed, fill: Fill | None = None) -> torch.Tensor | None:
        """Hidden states (T, H) from a captured graph, or None if this step is not decode-shaped."""
        n = len(packed.ids)
        bucket = next((b for b in self.buckets if b >= n), None)
        mask_size = sum(m.numel() for m in packed.masks if m is not None)
        if (
            bucket is None
            or packed.max_query_len > GRAPH_MAX_QUERY
            or packed.tables.shape[1] > self.width
            or mask_size > self.custom_mask.shape[0]
        ):
            return None
        self._stage(packed, bucket)
        if fill is not None:  # after the staging copy, in stream order
            self.ids[fill[0]] = fill[1].to(self.ids.dtype)
        if not self.capture:
            return self.forward(self.ids[:bucket], self.metas[bucket])[:n]
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:n]
