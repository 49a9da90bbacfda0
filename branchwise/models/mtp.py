"""DeepSeek-V3's multi-token-prediction (MTP) module, loaded from the layouts open checkpoints ship.

Entry j of the module reads the target's final-normed hidden state of position j - 1 (zeros at j = 0) and
the embedding of token j, RMS-normalises each, concatenates them (embedding first), projects back to the
hidden size, runs one decoder block of the target's own kind, then the shared head: it predicts token
j + 1, one further than the target's row j - 1 does. Re-applied on its own output it drafts a chain.
Entry j lives at K/V slot j of the sequence, so what a slot holds depends on tokens 0..j only and a block
shared through the prefix cache stays valid for every sequence that shares it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from branchwise import kernels
from branchwise.models.fused import fuse_drafter_layer, layer_forward, rms_norm, rope_rows
from branchwise.models.loader import decoder_of

log = logging.getLogger(__name__)

OWN_FILE = "mtp.safetensors"  # what `branchwise train mtp` writes beside a model, in DeepSeek-V3's layout
# the non-block parts of an MTP layer: (our name, DeepSeek-V3, MiMo); MiMo concatenates hidden first
PARTS = [
    ("enorm", "enorm", "token_layernorm"),
    ("hnorm", "hnorm", "hidden_layernorm"),
    ("eh_proj", "eh_proj", "input_proj"),
    ("shared_head.norm", "shared_head.norm", "final_layernorm"),
    ("shared_head.head", "shared_head.head", None),
    ("embed_tokens", "embed_tokens", None),
]


class MTPModule(nn.Module):
    """One MTP depth over a target model; embeddings and output head are the target's."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        decoder = decoder_of(target)
        config = copy.copy(target.config)
        hidden = config.hidden_size
        norm = type(decoder.norm)
        self.enorm, self.hnorm = norm(hidden, eps=config.rms_norm_eps), norm(hidden, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = type(decoder.layers[0])(config, layer_idx=0)  # its own one-layer K/V pool
        self.shared_head = nn.Module()
        self.shared_head.norm = norm(hidden, eps=config.rms_norm_eps)
        self.config = config
        self._target = [target]  # a list: not a submodule, its weights stay the target's
        self.fused = False

    def set_attention(self, name: str) -> None:
        """The attention function the block calls (ours when serving, SDPA when training)."""
        self.config._attn_implementation = name

    def fuse(self) -> None:
        """For serving only (the block's q/k/v and gate/up become one GEMM each: a trainer needs them apart):
        the block runs the target's lean fused path where its architecture has one."""
        if self.fused:  # once: its projections are fused in place
            return
        target = self._target[0]
        if type(decoder_of(target).embed_tokens) is not nn.Embedding:  # the lean path reads its weight
            return
        norms = (self.enorm, self.hnorm, self.shared_head.norm)
        self.fused = fuse_drafter_layer(self.block, target.config.model_type, target, norms)

    def forward(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        """(..., T) tokens and (..., T, H) hidden states of the positions before them -> (..., T, H)."""
        target = self._target[0]
        decoder = decoder_of(target)
        step = kwargs.get("branchwise_step")
        if self.fused and step is not None and input_ids.dim() == 1:  # serving: the target's lean path
            emb = decoder.embed_tokens.weight.index_select(0, input_ids)
            e, h = rms_norm(self.enorm, emb), rms_norm(self.hnorm, hidden.to(emb.dtype))
            x = kernels.linear(torch.cat([e, h], dim=-1), self.eh_proj.weight)
            return layer_forward(self.block, x, *rope_rows(decoder.rotary_emb, x, positions), step)
        emb = decoder.embed_tokens(input_ids)
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden.to(emb.dtype))], dim=-1))
        batched = x.dim() == 3
        if not batched:
            x, positions = x[None], positions[None]
        rope = decoder.rotary_emb(x, positions)
        x = self.block(x, position_ids=positions, position_embeddings=rope, use_cache=False, **kwargs)
        return x if batched else x[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._target[0].get_output_embeddings()(rms_norm(self.shared_head.norm, x))


def find_mtp(model_path: str, mtp_path: str | None = None) -> tuple[str, str] | None:
    """(file, key prefix) of the first MTP layer: the configured file, else the checkpoint's own shards
    (DeepSeek-V3/GLM-4.5: `model.layers.{num_hidden_layers}.`, MiMo: `model.mtp_layers.0.`), else our
    trainer's `mtp.safetensors` beside the model. None if there is none."""
    folder = Path(model_path)
    config_file = folder / "config.json"
    layers = json.loads(config_file.read_text()).get("num_hidden_layers") if config_file.exists() else None
    prefixes = [f"model.layers.{layers}.", "model.mtp_layers.0."]
    if mtp_path:
        files = [Path(mtp_path)]
    else:
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        files = [f for f in files if f.name != OWN_FILE] + [folder / OWN_FILE]
    for file in files:
        if not file.exists():
            continue
        with safe_open(str(file), "pt") as f:
            keys = set(f.keys())
        for prefix in prefixes:
            if any(k.startswith(prefix) and ("eh_proj" in k or "input_proj" in k) for k in keys):
                return str(file), prefix
    if mtp_path:
        raise ValueError(f"{mtp_path} holds no MTP layer (DeepSeek-V3 or MiMo key layout)")
    return None


def load_mtp(target: nn.Module, file: str, prefix: str) -> MTPModule:
    """The MTP module of `target` from `file`'s keys under `prefix`, on the target's device and dtype."""
    mimo = prefix.startswith("model.mtp_layers.")
    names = {(mimo_name if mimo else ds): ours for ours, ds, mimo_name in PARTS if (mimo_name or not mimo)}
    module = MTPModule(target)
    state = {}
    with safe_open(file, "pt") as f:
        for key in f.keys():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            part = next((n for n in names if rest.startswith(n + ".")), None)
            if part is None:
                state["block." + rest] = f.get_tensor(key)
            elif names[part] != "embed_tokens":  # the target's own embeddings serve
                state[names[part] + rest[len(part) :]] = f.get_tensor(key)
    head = state.pop("shared_head.head.weight", None)
    if head is not None and not torch.equal(head.to(torch.float32), _head_weight(target).float().cpu()):
        log.warning("the MTP layer's shared_head.head differs from the target's lm_head; using the target's")
    if mimo:  # MiMo's input_proj reads [hidden, embedding]; ours reads [embedding, hidden]
        w = state["eh_proj.weight"]
        state["eh_proj.weight"] = torch.cat(w.chunk(2, dim=1)[::-1], dim=1)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{file}: the MTP layer does not fit this model (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}); its block must be a decoder layer of the target's architecture"
        )
    param = next(target.parameters())
    return module.to(param.device, param.dtype).eval().requires_grad_(False)


def save_mtp(module: MTPModule, path: Path) -> None:
    """Write the module in DeepSeek-V3's layout (`model.layers.{num_hidden_layers}.*`), bf16."""
    prefix = f"model.layers.{module.config.num_hidden_layers}."
    state = {}
    for key, value in module.state_dict().items():
        key = key.removeprefix("block.")
        state[prefix + key] = value.detach().to(torch.bfloat16).contiguous().cpu()
    save_file(state, str(path), metadata={"format": "pt", "num_nextn_predict_layers": "1"})


def _head_weight(target: nn.Module) -> torch.Tensor:
    return target.get_output_embeddings().weight
