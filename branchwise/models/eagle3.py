"""EAGLE-3 drafters (Li et al. 2025), loaded from the authors' / SpecForge layout and the `speculators` one.

One decoder layer over [norm(embedding of token j), norm(h)], with q/k/v reading that 2H-wide input. For
the first draft h = fc(cat of the target's residual stream entering three of its layers, at position
j - 1); for later drafts h is the drafter's own output before the final norm. The head covers a draft
vocabulary; `d2t` maps a draft id to a target id (target = draft + d2t[draft]). Entry j lives at K/V slot
j of the sequence, as the MTP module's does, so prefix-cache hits and forked siblings stay valid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from branchwise.models.fused import fuse_drafter_layer, layer_forward, rms_norm, rope_rows
from branchwise.models.loader import decoder_of

FOLDER = "eagle3"  # what `branchwise train eagle3` writes beside a model
LAYER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "hidden_act",
    "vocab_size",
)


def read_config(folder: Path) -> dict:
    """The drafter's settings from either layout's config.json, in one shape: the layer's LlamaConfig
    fields, draft_vocab_size, target_hidden_size, norm_before_residual, aux_layers (None: the default)."""
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("speculators_model_type") == "eagle3":
        layer = dict(raw.get("transformer_layer_config", {}))
        top = raw
    elif any("Eagle3" in a for a in raw.get("architectures", [])):
        layer, top = raw, raw
    else:
        raise ValueError(f"{folder}: not an EAGLE-3 drafter (architectures {raw.get('architectures')})")
    eagle = top.get("eagle_config") or {}
    aux = top.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
    return {
        "layer": {k: layer[k] for k in LAYER_FIELDS if layer.get(k) is not None},
        "draft_vocab_size": top.get("draft_vocab_size")
        or layer.get("draft_vocab_size")
        or layer["vocab_size"],
        "target_hidden_size": top.get("target_hidden_size") or layer.get("target_hidden_size"),
        "norm_before_residual": bool(
            top.get("norm_before_residual", layer.get("norm_before_residual", False))
        ),
        "aux_layers": list(aux) if aux else None,
    }


def default_aux_layers(num_layers: int) -> list[int]:
    """The target layers whose incoming residual stream EAGLE-3 reads by default (vLLM, SGLang: 2, L // 2,
    L - 3), kept inside a shallow model."""
    return [min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)]


class Eagle3Drafter(nn.Module):
    """The EAGLE-3 layer over a target; embeddings are the target's unless the checkpoint has its own."""

    def __init__(self, target: nn.Module, settings: dict) -> None:
        super().__init__()
        tc = target.config
        config = LlamaConfig(**({"vocab_size": tc.vocab_size} | settings["layer"]))
        config.num_hidden_layers = 1
        hidden = config.hidden_size
        self.target_hidden = settings["target_hidden_size"] or tc.hidden_size
        self.norm_before_residual = settings["norm_before_residual"]
        self.aux_layers = settings["aux_layers"] or default_aux_layers(tc.num_hidden_layers)
        self.midlayer = LlamaDecoderLayer(config, layer_idx=0)  # its own one-layer K/V pool
        attn, head_dim = self.midlayer.self_attn, self.midlayer.self_attn.head_dim
        attn.q_proj = nn.Linear(2 * hidden, config.num_attention_heads * head_dim, bias=False)
        attn.k_proj = nn.Linear(2 * hidden, config.num_key_value_heads * head_dim, bias=False)
        attn.v_proj = nn.Linear(2 * hidden, config.num_key_value_heads * head_dim, bias=False)
        self.midlayer.hidden_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.fc = nn.Linear(len(self.aux_layers) * self.target_hidden, hidden, bias=False)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        draft_vocab = settings["draft_vocab_size"]
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(tc.vocab_size, dtype=torch.bool))
        # target id of each draft id (draft + d2t), set once the weights are in: not rebuilt every step
        self.register_buffer("target_ids", torch.arange(draft_vocab), persistent=False)
        self.embed_tokens: nn.Embedding | None = None  # the target's unless loaded
        self.rotary = LlamaRotaryEmbedding(config)
        self.config = config
        self._target = [target]  # a list: not a submodule, its weights stay the target's
        self.fused = False

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        return 1, self.config.num_key_value_heads, self.midlayer.self_attn.head_dim

    def set_attention(self, name: str) -> None:
        self.config._attn_implementation = name

    def fuse(self) -> None:
        """For serving only: the layer runs the target's lean fused path (one GEMM for q/k/v, one for
        gate/up), where the target's architecture has one."""
        if self.fused:  # once: its projections are fused in place
            return
        norms = (self.midlayer.hidden_norm, self.norm)
        self.fused = fuse_drafter_layer(self.midlayer, "llama", self._target[0], norms)

    def forward(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """(..., T) tokens, (..., T, 3 H_target) target features or (..., T, H) the drafter's own output,
        of the positions before them -> (..., T, H) output before the final norm."""
        embed = (
            self.embed_tokens if self.embed_tokens is not None else decoder_of(self._target[0]).embed_tokens
        )
        emb = embed(input_ids)
        h = hidden.to(emb.dtype)
        if h.shape[-1] != self.config.hidden_size:
            h = self.fc(h)
        layer = self.midlayer
        step = kwargs.get("branchwise_step")
        if self.fused and step is not None and input_ids.dim() == 1:  # serving: the target's lean path
            normed = rms_norm(layer.hidden_norm, h)
            residual = normed if self.norm_before_residual else h
            x = torch.cat([rms_norm(layer.input_layernorm, emb), normed], dim=-1)
            return layer_forward(layer, residual, *rope_rows(self.rotary, x, positions), step, x)
        if self.norm_before_residual:
            h = residual = layer.hidden_norm(h)
        else:
            residual, h = h, layer.hidden_norm(h)
        x = torch.cat([layer.input_layernorm(emb), h], dim=-1)
        batched = x.dim() == 3
        if not batched:
            x, residual, positions = x[None], residual[None], positions[None]
        rope = self.rotary(x, positions)
        attn, _ = layer.self_attn(hidden_states=x, position_embeddings=rope, attention_mask=None, **kwargs)
        residual = residual + attn
        out = residual + layer.mlp(layer.post_attention_layernorm(residual))
        return out if batched else out[0]

    def draft_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary."""
        return self.lm_head(rms_norm(self.norm, x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the target vocabulary: tokens outside the draft vocabulary get the lowest finite
        value (never drafted, unless a grammar allows nothing else: then no NaN)."""
        small = self.draft_logits(x)
        full = small.new_full((*small.shape[:-1], self.t2d.shape[0]), torch.finfo(small.dtype).min)
        full[..., self.target_ids] = small
        return full


def find_eagle3(model_path: str, eagle_path: str | None = None) -> str | None:
    """The drafter folder: the configured one, else eagle3/ beside the model; None if there is none."""
    folder = Path(eagle_path) if eagle_path else Path(model_path) / FOLDER
    if (folder / "config.json").exists():
        read_config(folder)  # a clear error now for a folder of another kind
        return str(folder)
    if eagle_path:
        raise ValueError(f"{eagle_path}: no config.json of an EAGLE-3 drafter")
    return None


def load_eagle3(target: nn.Module, folder: str) -> Eagle3Drafter:
    """The drafter in `folder` (safetensors shards; `midlayer.*` or `layers.0.*` keys), on the target's
    device and dtype."""
    settings = read_config(Path(folder))
    drafter = Eagle3Drafter(target, settings)
    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                name = key.removeprefix("model.")
                name = "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name
                state[name] = f.get_tensor(key)
    if "embed_tokens.weight" in state:  # its own embedding, else the target's
        drafter.embed_tokens = nn.Embedding(*state["embed_tokens.weight"].shape)
    if "t2d" not in state:
        state["t2d"] = drafter.t2d
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("rotary")]
    if missing or unexpected:
        raise ValueError(
            f"{folder}: not an EAGLE-3 drafter for this model (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]})"
        )
    layers = target.config.num_hidden_layers
    if not all(0 <= i < layers for i in drafter.aux_layers):
        raise ValueError(
            f"{folder}: eagle_aux_hidden_state_layer_ids {drafter.aux_layers} must name target layers "
            f"0..{layers - 1} (the residual stream entering each)"
        )
    width = drafter.fc.weight.shape[1]
    if width != len(drafter.aux_layers) * target.config.hidden_size:
        raise ValueError(
            f"{folder}: fc reads {width} features; the target gives 3 x {target.config.hidden_size}"
        )
    drafter.target_ids = torch.arange(len(drafter.d2t)) + drafter.d2t
    param = next(target.parameters())
    return drafter.to(param.device, param.dtype).eval().requires_grad_(False)


def save_eagle3(drafter: Eagle3Drafter, folder: Path) -> None:
    """Write the drafter in the authors' layout (config.json with LlamaForCausalLMEagle3, bf16 weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    c = drafter.config
    config = {k: getattr(c, k) for k in LAYER_FIELDS if getattr(c, k, None) is not None}
    if "rope_theta" not in config and isinstance(config.get("rope_parameters"), dict):
        config["rope_theta"] = config["rope_parameters"].get("rope_theta")  # what older readers look for
    config |= {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "draft_vocab_size": drafter.lm_head.weight.shape[0],
        "target_hidden_size": drafter.target_hidden,
        "norm_before_residual": drafter.norm_before_residual,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": drafter.aux_layers,
            "use_aux_hidden_state": True,
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {}
    for key, value in drafter.state_dict().items():
        if key.startswith("rotary"):
            continue
        keep = value.dtype in (torch.long, torch.bool)
        state[key] = (value if keep else value.to(torch.bfloat16)).detach().contiguous().cpu()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
