"""The attention function registered with transformers: paged K/V, masks as data.

Every attention layer of a loaded model calls `paged_attention_forward` with its RoPE'd q/k/v and the step
context we pass through the model's forward kwargs. It writes the new K/V into the paged cache and attends
over cached + new tokens; HF's own KV cache and mask building are off (`use_cache=False`, no mask function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from branchwise import kernels
from branchwise.kernels.metadata import AttentionMetadata

ATTENTION_NAME = "branchwise_paged"


@dataclass
class StepContext:
    kv: torch.Tensor  # this model's pool: (layers, 2, blocks, block_size, kv_heads, head_dim)
    meta: AttentionMetadata
    layer_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # kv[l, 0], kv[l, 1], made once


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, Hq, T, D)
    key: torch.Tensor,  # (1, Hkv, T, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    step: StepContext = kwargs["branchwise_step"]
    q = query[0].transpose(0, 1)  # (T, Hq, D)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    out = kernels.attend(
        q, k, v, step.kv, module.layer_idx, step.meta, scale, sliding_window, step.layer_caches
    )
    return out[None], None  # (1, T, Hq, D)


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
