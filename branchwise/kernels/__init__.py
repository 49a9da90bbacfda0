"""Attention kernels: Triton on CUDA, the PyTorch reference elsewhere (`BRANCHWISE_ATTENTION` forces one)."""

from __future__ import annotations

import os

import torch

from branchwise.kernels import reference
from branchwise.kernels.metadata import AttentionMetadata, build_metadata

__all__ = ["AttentionMetadata", "build_metadata", "backend", "store_kv", "paged_attention"]


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
