"""Fused projections for Llama-family layers: q/k/v as one GEMM, gate/up as one GEMM.

A decode step reads every weight once and does little else, so seven GEMM launches a layer becoming four
is time saved (the small k/v projections were launches of their own), and every GEMM goes through
`kernels.linear`, which may take the skinny Triton GEMM. Applied at load to the architectures whose
attention and MLP forwards are mirrored here; any other model keeps HF's modules. A fused model runs
`fused_forward`, HF's decoder math op for op without HF's per-module Python (see its docstring).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from branchwise import kernels

FUSED_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}


def _concat(*projs: nn.Linear) -> nn.Linear:
    """One Linear whose output is the projections' outputs side by side (the originals are released)."""
    weight = torch.cat([p.weight for p in projs])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=projs[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if projs[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in projs]), requires_grad=False)
    return fused


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (T, heads, D) with the rounding of HF's `apply_rotary_pos_emb`, x * cos + rotate_half(x) *
    sin, in four ops: rotate_half(x) is x rolled by half with its first half negated, and the negation
    moves onto sin (`signed_sin`: (-a) * b == a * (-b) exactly)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # frequencies that do not move with the sequence length


def rope_rows(rotary: nn.Module, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(T, 1, D) cos and signed sin (as `rotate` takes them) of HF's rotary module at the positions. On the
    CPU, rows of a table that module computed once: each entry is one product inv_freq * position, so a
    row does not depend on which positions shared the call (about 25 small ops a forward saved). A compiled
    forward (a graph: its ops cost nothing a replay), a GPU, and rotary types whose frequencies move with
    the length compute afresh."""
    table = rotary.__dict__.get("rows_table")  # (n, 2, D): cos | signed sin of positions 0..n-1
    eager_cpu = h.device.type == "cpu" and not torch.compiler.is_compiling()
    if not eager_cpu or getattr(rotary, "rope_type", None) not in STATIC_ROPE:
        return _signed(*rotary(h, positions[None]))
    if table is None or table.shape[0] <= int(positions.max()) or table.dtype != h.dtype:
        n = max(1024, 1 << int(positions.max()).bit_length())
        cos, sin = _signed(*rotary(h, torch.arange(n, device=h.device)[None]))
        table = rotary.__dict__["rows_table"] = torch.cat((cos, sin), dim=1)
    rows = table.index_select(0, positions)  # one gather for both
    return rows[:, :1], rows[:, 1:]


def _signed(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """HF's (1, T, D) cos and sin -> (T, 1, D) cos and sin with its first half negated."""
    half = sin.shape[-1] // 2
    return cos[0, :, None], torch.cat((-sin[0, :, None, :half], sin[0, :, None, half:]), dim=-1)


def check_one_op_norm(norm: nn.Module) -> None:
    """Mark an HF RMSNorm that one `F.rms_norm` call reproduces bit for bit (on the CPU, where its five
    ops cost a small model's decode step more than the math; a GPU step is one graph replay anyway)."""
    eps, w = getattr(norm, "variance_epsilon", None), getattr(norm, "weight", None)
    norm.one_op = False
    if eps is None or w is None or w.device.type != "cpu" or not type(norm).__name__.endswith("RMSNorm"):
        return
    rows = torch.arange(64 * w.shape[0], device=w.device).view(64, -1)
    probe = (rows.sin() * rows.remainder(97)).to(w.dtype)  # many scales, no draw from the global generator
    with torch.no_grad():
        norm.one_op = torch.equal(norm.forward(probe), F.rms_norm(probe, w.shape, w, eps))


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's output: one op where `check_one_op_norm` found that exact, else its own forward."""
    if norm.__dict__.get("one_op"):
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm.forward(x)


class FusedAttention(nn.Module):
    """Mixed into an HF attention class: q/k/v from one GEMM (q_norm/k_norm if any), RoPE on q and k
    together (one set of elementwise ops), on (T, heads, D) throughout: no transposes."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step) -> torch.Tensor:
        """`sin` signed as `rotate` takes it."""
        qkv_w, qkv_b, o_w, o_b = self.weights
        qkv = kernels.linear(x, qkv_w, qkv_b).view(x.shape[0], -1, self.head_dim)
        nq, nkv = self.num_heads_here
        if self.has_qk_norm:
            q = rotate(rms_norm(self.q_norm, qkv[:, :nq]), cos, sin)
            k = rotate(rms_norm(self.k_norm, qkv[:, nq : nq + nkv]), cos, sin)
        else:
            qk = rotate(qkv[:, : nq + nkv], cos, sin)
            q, k = qk[:, :nq], qk[:, nq:]
        v = qkv[:, nq + nkv :]
        out = kernels.attend(
            q, k, v, step.kv, self.layer_idx, step.meta, self.scaling, self.window, step.layer_caches
        )
        out = kernels.linear(out.reshape(x.shape[0], -1), o_w, o_b)
        return self.reduce(out) if self.reduce else out


class FusedMLP(nn.Module):
    """Mixed into an HF gated MLP class: down(act(gate(x)) * up(x)) with gate and up as one GEMM."""

    def forward(self, x):
        gate_up_w, gate_up_b, down_w, down_b = self.weights
        gate, up = kernels.linear(x, gate_up_w, gate_up_b).chunk(2, -1)
        out = kernels.linear(self.act(gate) * up, down_w, down_b)
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
    attn.num_heads_here = (attn.qkv_sizes[0] // attn.head_dim, attn.qkv_sizes[1] // attn.head_dim)
    _mix(attn, FusedAttention)
    mlp.gate_up_proj = _concat(mlp.gate_proj, mlp.up_proj)
    del mlp.gate_proj, mlp.up_proj
    _mix(mlp, FusedMLP)
    # the forwards read plain attributes: a submodule's parameter costs two nn.Module lookups a layer, and
    # HF's SiLU module a module call, where a small model's decode step is mostly such per-op overhead
    qkv, o = attn.qkv_proj, attn.o_proj
    attn.__dict__["weights"] = (qkv.weight, qkv.bias, o.weight, o.bias)
    mlp.__dict__["weights"] = (
        mlp.gate_up_proj.weight,
        mlp.gate_up_proj.bias,
        mlp.down_proj.weight,
        mlp.down_proj.bias,
    )
    silu = isinstance(mlp.act_fn, nn.SiLU) or type(mlp.act_fn).__name__ == "SiLUActivation"
    mlp.act = F.silu if silu else mlp.act_fn
    for norm in (layer.input_layernorm, layer.post_attention_layernorm, *_qk_norms(attn)):
        check_one_op_norm(norm)


def _qk_norms(attn: nn.Module) -> tuple[nn.Module, ...]:
    return (attn.q_norm, attn.k_norm) if attn.has_qk_norm else ()


def fuse_projections(model: nn.Module, reduce: Callable | None = None) -> bool:
    """Fuse every decoder layer of a supported architecture in place; False (untouched) otherwise."""
    model_type = model.config.model_type
    layers = getattr(getattr(model, model.base_model_prefix, None), "layers", None)
    if model_type not in FUSED_ARCHITECTURES or layers is None:
        return False
    for layer in layers:
        fuse_layer(layer, model_type, reduce)
    check_one_op_norm(getattr(model, model.base_model_prefix).norm)
    pick_cpu_layout(fused_weights(model))
    return True


COLUMN_MAJOR_LIMIT = 1 << 30  # bytes of weights past which the layout is not probed (it copies them once)


@torch.no_grad()
def pick_cpu_layout(weights: list[torch.Tensor]) -> bool:
    """Store the CPU GEMM weights column-major if decode-shaped GEMMs over all of them in a row, as a step
    reads them (1 and 8 rows), run at least 5 % faster that way: F.linear then makes one plain x @ (K, N)
    GEMM, which on an AVX2 EPYC with MKL makes the demo's decode steps 10-15 % faster. Same shapes and
    values; kept row-major where it is no clear win, off the CPU, and for weights past COLUMN_MAJOR_LIMIT."""
    if not weights or weights[0].device.type != "cpu" or weights[0].dim() != 2:
        return False
    if sum(w.numel() * w.element_size() for w in weights) > COLUMN_MAJOR_LIMIT:
        return False
    columns = [column_major(w.data) for w in weights]
    rows = [w.data for w in weights]
    inputs = {r: [torch.ones(r, w.shape[1], dtype=w.dtype) for w in weights] for r in (1, 8)}

    def sweep(tensors: list[torch.Tensor]) -> float:
        started = time.perf_counter()
        for xs in inputs.values():
            for x, w in zip(xs, tensors, strict=True):
                F.linear(x, w)
        return time.perf_counter() - started

    best = {"rows": float("inf"), "columns": float("inf")}
    for _ in range(7):  # interleaved, best of 7 (the first rounds warm the threads and caches)
        best["rows"] = min(best["rows"], sweep(rows))
        best["columns"] = min(best["columns"], sweep(columns))
    if best["columns"] >= 0.95 * best["rows"]:
        return False
    for w, c in zip(weights, columns, strict=True):
        w.data = c
    return True


def is_fused(decoder: nn.Module) -> bool:
    layers = getattr(decoder, "layers", None)
    return bool(layers) and isinstance(layers[0].self_attn, FusedAttention)


def fused_forward(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    step,
    aux: torch.Tensor | None = None,
    aux_layers: tuple[int, ...] = (),
) -> torch.Tensor:
    """(T,) tokens -> (T, H) final-normed hidden states of a fused decoder: the math of HF's forward (its
    norms, residuals, rotary table), without its module calls, decorators and mask building, which cost a
    small model's decode step more than its GEMMs. `aux` gets the residual stream entering `aux_layers`."""
    embed = decoder.embed_tokens
    h = embed.weight.index_select(0, input_ids) if type(embed) is nn.Embedding else embed(input_ids)
    cos, sin = rope_rows(decoder.rotary_emb, h, positions)  # once for every layer
    hidden = h.shape[-1]
    # islice: slicing a ModuleList builds a new one, every forward
    for i, layer in enumerate(islice(decoder.layers, decoder.config.num_hidden_layers)):
        for k, j in enumerate(aux_layers):  # a layer may be named twice
            if j == i:
                aux[: h.shape[0], k * hidden : (k + 1) * hidden].copy_(h)
        h = layer_forward(layer, h, cos, sin, step)
    return rms_norm(decoder.norm, h)


def layer_forward(
    layer: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    step,
    x: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fused decoder layer on the residual stream h; `x` is what its attention reads if not norm(h)
    (an EAGLE-3 layer's [embedding, hidden])."""
    x = rms_norm(layer.input_layernorm, h) if x is None else x
    h = h + layer.self_attn.forward(x, cos, sin, step)
    return h + layer.mlp.forward(rms_norm(layer.post_attention_layernorm, h))


def fuse_drafter_layer(
    layer: nn.Module, model_type: str, target: nn.Module, norms: tuple[nn.Module, ...] = ()
) -> bool:
    """Fuse a drafter's decoder layer (an MTP block, an EAGLE-3 layer) for serving, as the target's are
    (their storage order too); its other `norms` checked for the one-op path. False (untouched) for an
    architecture not mirrored."""
    if model_type not in FUSED_ARCHITECTURES or not hasattr(layer.mlp, "gate_proj"):
        return False
    fuse_layer(layer, model_type)
    for norm in norms:
        check_one_op_norm(norm)
    theirs = fused_weights(target)
    if theirs and theirs[0].stride() == column_major(theirs[0]).stride():
        for w in fused_weights(layer):
            w.data = column_major(w.data)
    return True


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same (N, K) weight stored column-major (itself if it already is)."""
    return weight.t().contiguous().t()


def fused_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights whose GEMMs go through `kernels.linear` (the skinny GEMM is tuned for their shapes)."""
    weights = []
    for m in model.modules():
        if isinstance(m, FusedAttention):
            weights += [m.qkv_proj.weight, m.o_proj.weight]
        elif isinstance(m, FusedMLP):
            weights += [m.gate_up_proj.weight, m.down_proj.weight]
    return weights
