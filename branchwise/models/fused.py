"""Fused projections for Llama-family layers: q/k/v as one GEMM, gate/up as one GEMM.

A decode step reads every weight once and does little else, so seven GEMM launches a layer becoming four
is time saved (the small k/v projections were launches of their own), and every GEMM goes through
`kernels.linear`, which may take the skinny Triton GEMM. Applied at load to the architectures whose
attention and MLP forwards are mirrored here; any other model keeps HF's modules.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from branchwise import kernels
from branchwise.models.attention import paged_attention_forward

FUSED_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}


def _concat(*projs: nn.Linear) -> nn.Linear:
    """One Linear whose output is the projections' outputs side by side (the originals are released)."""
    weight = torch.cat([p.weight for p in projs])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=projs[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if projs[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in projs]), requires_grad=False)
    return fused


class FusedAttention(nn.Module):
    """Mixed into an HF attention class: its forward, with q/k/v from one GEMM (q_norm/k_norm if any)."""

    def forward(
        self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs
    ):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        qkv = kernels.linear(hidden_states, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = (t.view(shape) for t in qkv.split(self.qkv_sizes, -1))
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.apply_rotary(q, k, *position_embeddings)
        out, _ = paged_attention_forward(
            self, q, k, v, None, scaling=self.scaling, sliding_window=self.window, **kwargs
        )
        out = out.reshape(*hidden_states.shape[:-1], -1)
        out = kernels.linear(out, self.o_proj.weight, self.o_proj.bias)
        return (self.reduce(out) if self.reduce else out), None


class FusedMLP(nn.Module):
    """Mixed into an HF gated MLP class: down(act(gate(x)) * up(x)) with gate and up as one GEMM."""

    def forward(self, x):
        gate, up = kernels.linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias).chunk(2, -1)
        out = kernels.linear(self.act_fn(gate) * up, self.down_proj.weight, self.down_proj.bias)
        return self.reduce(out) if self.reduce else out


_classes: dict[tuple[type, type], type] = {}


def _mix(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if (cls, mixin) not in _classes:
        _classes[(cls, mixin)] = type(f"Fused{cls.__name__}", (mixin, cls), {})
    module.__class__ = _classes[(cls, mixin)]


def fuse_layer(layer: nn.Module, model_type: str, reduce: Callable | None = None) -> None:
    """Fuse one decoder layer's projections in place; `reduce` sums the o/down outputs of tensor-parallel
    ranks (each holds whole heads of q/k/v and a slice of gate/up, so its o/down outputs are partial)."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.reduce = mlp.reduce = reduce
    attn.qkv_sizes = [p.weight.shape[0] for p in (attn.q_proj, attn.k_proj, attn.v_proj)]  # this rank's
    attn.qkv_proj = _concat(attn.q_proj, attn.k_proj, attn.v_proj)
    del attn.q_proj, attn.k_proj, attn.v_proj
    attn.has_qk_norm = hasattr(attn, "q_norm")
    # the window each architecture's own forward passes to the attention function
    attn.window = getattr(attn, "sliding_window", None)
    if model_type == "mistral":
        attn.window = getattr(attn.config, "sliding_window", None)
    attn.apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # a plain function
    _mix(attn, FusedAttention)
    mlp.gate_up_proj = _concat(mlp.gate_proj, mlp.up_proj)
    del mlp.gate_proj, mlp.up_proj
    _mix(mlp, FusedMLP)


def fuse_projections(model: nn.Module, reduce: Callable | None = None) -> bool:
    """Fuse every decoder layer of a supported architecture in place; False (untouched) otherwise."""
    model_type = model.config.model_type
    layers = getattr(getattr(model, model.base_model_prefix, None), "layers", None)
    if model_type not in FUSED_ARCHITECTURES or layers is None:
        return False
    for layer in layers:
        fuse_layer(layer, model_type, reduce)
    return True


def fused_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights whose GEMMs go through `kernels.linear` (the skinny GEMM is tuned for their shapes)."""
    weights = []
    for m in model.modules():
        if isinstance(m, FusedAttention):
            weights += [m.qkv_proj.weight, m.o_proj.weight]
        elif isinstance(m, FusedMLP):
            weights += [m.gate_up_proj.weight, m.down_proj.weight]
    return weights
