"""Kernels: Triton on CUDA, the PyTorch reference elsewhere (`BRANCHWISE_ATTENTION` forces one for attention).

The decoder's GEMMs go through `linear`: torch (cuBLAS) unless the weight's shape was measured faster with
the skinny Triton GEMM on this device (`LINEAR_CONFIGS`, filled by `triton_linear.tune` at start-up).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from branchwise.kernels import reference
from branchwise.kernels.metadata import AttentionMetadata, build_metadata

__all__ = [
    "AttentionMetadata",
    "build_metadata",
    "backend",
    "attend",
    "store_kv",
    "paged_attention",
    "linear",
]

SKINNY_MAX_ROWS = 16  # rows of x the skinny GEMM takes (one tensor-core tile)
# (N, K, dtype) of a weight -> skinny GEMM config (block_n, block_k, splits, num_warps, num_stages)
LINEAR_CONFIGS: dict[tuple[int, int, torch.dtype], tuple[int, int, int, int, int]] = {}


def backend(device: torch.device) -> str:
    """'triton' or 'reference' for tensors on `device`."""
    forced = os.environ.get("BRANCHWISE_ATTENTION", "").lower()
    if forced in ("reference", "triton"):
        return forced
    if forced:
        raise ValueError(f"BRANCHWISE_ATTENTION must be 'reference' or 'triton', not {forced!r}")
    return "triton" if device.type == "cuda" else "reference"


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    if backend(key.device) == "triton":
        from branchwise.kernels import triton_attention

        return triton_attention.store_kv(key, value, k_cache, v_cache, slot_mapping)
    return reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window=None):
    if backend(query.device) == "triton":
        from branchwise.kernels import triton_attention

        return triton_attention.paged_attention(query, k_cache, v_cache, meta, scale, sliding_window)
    return reference.paged_attention(query, k_cache, v_cache, meta, scale, sliding_window)


def attend(
    query,
    key,
    value,
    kv: torch.Tensor,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    sliding_window=None,
    layer_caches=None,
):
    """Write one layer's new K/V into the pool `kv` (layers, 2, blocks, block_size, Hkv, D), then attend;
    `layer_caches[layer]` is (kv[layer, 0], kv[layer, 1]) made ahead, if given."""
    chosen = meta.backend or backend(query.device)  # chosen once per step, not in every layer
    if chosen == "reference":
        k_cache, v_cache = layer_caches[layer] if layer_caches is not None else (kv[layer, 0], kv[layer, 1])
        reference.store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        return reference.paged_attention(query, k_cache, v_cache, meta, scale, sliding_window)
    if meta.graph_splits:
        from branchwise.kernels import triton_attention  # noqa: F401  (registers the op)

        return torch.ops.branchwise.token_tile_attention(
            query,
            key,
            value,
            kv,
            layer,
            meta.slot_mapping,
            meta.token_seqs,
            meta.token_index,
            meta.query_start,
            meta.seq_lens,
            meta.block_tables,
            meta.mask_offsets,
            meta.custom_mask,
            meta.positions,
            scale,
            sliding_window or 0,
            meta.graph_splits,
            meta.block_size,
        )
    store_kv(key, value, kv[layer, 0], kv[layer, 1], meta.slot_mapping)
    return paged_attention(query, kv[layer, 0], kv[layer, 1], meta, scale, sliding_window)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias; at most 16 rows take the skinny Triton GEMM where it was tuned for the shape."""
    config = LINEAR_CONFIGS.get((weight.shape[0], weight.shape[1], weight.dtype)) if LINEAR_CONFIGS else None
    if config is None or not weight.is_contiguous():  # the skinny GEMM reads row-major weights only
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_MAX_ROWS:
        return F.linear(x, weight, bias)
    from branchwise.kernels import triton_linear  # noqa: F401  (registers the op)

    out = torch.ops.branchwise.skinny_linear(x.reshape(rows, x.shape[-1]), weight, bias, *config)
    return out.view(*x.shape[:-1], weight.shape[0])
