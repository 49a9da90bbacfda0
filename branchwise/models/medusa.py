"""Medusa heads (Cai et al. 2024): extra output heads that guess tokens 2, 3, ... positions ahead.

Head k reads the target's final-normed hidden state of the last position and predicts the token k + 2
ahead (the target's own head predicts k = -1): `medusa_num_layers` residual blocks x + SiLU(Wx + b), then
a vocabulary projection. Stored as the authors release them: `config.json` (`medusa_num_heads`,
`medusa_num_layers`, `base_model_name_or_path`) beside `medusa_lm_head.safetensors` or `.pt`, with keys
`{head}.{layer}.linear.{weight,bias}` for the blocks and `{head}.{num_layers}.weight` for the projection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHT_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")


class ResBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)  # the authors' init: each block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """`num_heads` heads over hidden states (..., H) -> logits (num_heads, ..., V)."""

    def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int) -> None:
        super().__init__()
        self.num_heads, self.num_layers = num_heads, num_layers
        self.heads = nn.ModuleList(
            nn.Sequential(
                *[ResBlock(hidden) for _ in range(num_layers)], nn.Linear(hidden, vocab, bias=False)
            )
            for _ in range(num_heads)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(hidden) for head in self.heads])


def stack_heads(heads: MedusaHeads) -> Callable[[torch.Tensor], torch.Tensor]:
    """The heads' inference forward with their weights stacked per layer: one batched matmul per block
    layer and one for the projections, where the module runs a small GEMM per head and layer. The module's
    parameters become views of the stacked weights: nothing is stored twice."""

    def stacked(params: list[nn.Parameter]) -> torch.Tensor:
        weight = torch.stack([p.data for p in params])
        for k, p in enumerate(params):
            p.data = weight[k]
        return weight

    layers = [[head[i] for head in heads.heads] for i in range(heads.num_layers + 1)]
    blocks = [
        (
            stacked([b.linear.weight for b in layer]).transpose(1, 2),
            stacked([b.linear.bias for b in layer])[:, None],
        )
        for layer in layers[:-1]
    ]
    projection = stacked([p.weight for p in layers[-1]]).transpose(1, 2)  # (heads, H, V)

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (heads, ..., V)
        x = hidden.reshape(1, -1, hidden.shape[-1]).expand(heads.num_heads, -1, -1)
        for weight, bias in blocks:
            x = x + nn.functional.silu(torch.baddbmm(bias, x, weight))
        return torch.bmm(x, projection).view(heads.num_heads, *hidden.shape[:-1], -1)

    return forward


def find_heads(model_path: str, heads_path: str | None = None) -> str | None:
    """The heads' folder: the configured one, else a `medusa/` folder beside the model, else the model's
    own folder if it holds the heads' files; None if there are none."""
    candidates = [Path(heads_path)] if heads_path else [Path(model_path) / "medusa", Path(model_path)]
    for folder in candidates:
        if any((folder / name).exists() for name in WEIGHT_FILES):
            return str(folder)
    if heads_path:
        raise ValueError(f"{heads_path} holds no Medusa heads ({' or '.join(WEIGHT_FILES)})")
    return None


def load_heads(path: str, target: nn.Module) -> MedusaHeads:
    """Heads from the authors' layout, on the target's device and dtype; the head count is read from the
    weights (v0.1 configs may name fewer heads than the file holds)."""
    folder = Path(path)
    file = next(folder / name for name in WEIGHT_FILES if (folder / name).exists())
    if file.suffix == ".pt":
        state = torch.load(file, map_location="cpu", weights_only=True)
    else:
        state = load_file(str(file))
    state = {k.removeprefix("medusa_head."): v for k, v in state.items()}
    keys = [re.match(r"(\d+)\.(\d+)\.", k) for k in state]
    num_heads = 1 + max(int(m[1]) for m in keys if m)
    num_layers = max(int(m[2]) for m in keys if m)  # the last index is the projection
    config_file = folder / "config.json"
    if config_file.exists():
        layers = json.loads(config_file.read_text()).get("medusa_num_layers", num_layers)
        if layers != num_layers:
            raise ValueError(f"{config_file}: medusa_num_layers {layers} but the weights have {num_layers}")
    hidden = target.config.hidden_size
    vocab = target.get_output_embeddings().weight.shape[0]
    heads = MedusaHeads(hidden, vocab, num_heads, num_layers)
    try:
        heads.heads.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file}: the heads do not fit this model ({str(e).splitlines()[0]})") from e
    param = next(target.parameters())
    return heads.to(param.device, param.dtype).eval().requires_grad_(False)


def save_heads(heads: MedusaHeads, folder: Path, base_model: str) -> None:
    """The authors' layout: config.json + medusa_lm_head.safetensors (bf16)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in heads.heads.state_dict().items()}
    save_file(state, str(folder / WEIGHT_FILES[0]), metadata={"format": "pt"})
    config = {
        "medusa_num_heads": heads.num_heads,
        "medusa_num_layers": heads.num_layers,
        "base_model_name_or_path": base_model,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
