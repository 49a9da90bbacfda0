"""`branchwise train medusa`: Medusa heads for a frozen model, by self-distillation.

The model writes its own training text (as for the MTP module: greedy completions of a prompt set, a
quarter sampled), then head k learns, at every position, the model's own distribution of the token k + 1
beyond the one the model predicts there (soft cross-entropy, head k weighted 0.8^k as the authors do).
Each head starts as the identity block and a copy of the model's output projection. Saved in the authors'
layout (`config.json` + `medusa_lm_head.safetensors`), by default in a `medusa/` folder beside the model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from branchwise.models.loader import decoder_of
from branchwise.models.medusa import MedusaHeads, load_heads, save_heads
from branchwise.train.distill import fit, pad_batch, prepare, soft_cross_entropy

log = logging.getLogger(__name__)

HEAD_DECAY = 0.8


def new_heads(base: torch.nn.Module, num_heads: int, num_layers: int) -> MedusaHeads:
    hidden = base.config.hidden_size
    lm_head = base.get_output_embeddings().weight
    heads = MedusaHeads(hidden, lm_head.shape[0], num_heads, num_layers)
    with torch.no_grad():
        for head in heads.heads:
            head[-1].weight.copy_(lm_head)
    return heads


def medusa_loss(
    base: torch.nn.Module, heads: MedusaHeads, ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, list[float]]:
    """(loss, per-head top-1 agreement with the model): head k at position t against the model's
    distribution at position t + k + 1."""
    with torch.no_grad():
        hidden = decoder_of(base)(input_ids=ids, use_cache=False).last_hidden_state
        teacher = F.softmax(base.get_output_embeddings()(hidden).float(), dim=-1)
    logits = heads(hidden)
    loss, agree = 0.0, []
    for k in range(heads.num_heads):
        shift = k + 1
        head, target, mask = logits[k][:, :-shift], teacher[:, shift:], valid[:, shift:]
        loss = loss + HEAD_DECAY**k * soft_cross_entropy(head, target, mask)
        same = (head.argmax(-1) == target.argmax(-1)).float()
        agree.append(float((same * mask).sum() / mask.sum().clamp(min=1)))
    return loss, agree


def train_medusa(
    model_path: str,
    out: Path | None = None,
    minutes: float = 10.0,
    device: str = "auto",
    seed: int = 0,
    num_heads: int = 4,
    num_layers: int = 1,
    num_prompts: int = 2000,
    max_tokens: int = 160,
    data: str | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    init: str | None = None,
) -> dict:
    """Train Medusa heads for the model at `model_path` within `minutes`; writes the heads' folder `out`
    (default: medusa/ beside the model) with a JSON record of the run. `init`: a heads' folder to
    continue from."""
    out = out or Path(model_path) / "medusa"
    run = prepare(model_path, data, num_prompts, seed + 11, max_tokens, device, seed)
    base, dev = run.base, run.device
    if init:
        heads = load_heads(init, base).float().requires_grad_(True).train()
        num_heads, num_layers = heads.num_heads, heads.num_layers
    else:
        heads = new_heads(base, num_heads, num_layers).to(dev).train()
    pad = base.config.pad_token_id or 0
    held = run.rows[: max(1, len(run.rows) // 20)]  # agreement is reported on rows the heads never train on
    run.rows = run.rows[len(held) :]
    history = fit(
        heads,
        lambda ids, valid: medusa_loss(base, heads, ids, valid)[0],
        run.rows,
        pad,
        run.seconds_left(minutes),
        batch_size,
        lr,
        seed,
        "medusa heads",
    )
    heads.eval()
    agree = torch.zeros(num_heads)
    with torch.no_grad():
        for at in range(0, len(held), batch_size):
            chunk = held[at : at + batch_size]
            agree += (
                torch.tensor(medusa_loss(base, heads, *pad_batch(chunk, pad, dev))[1])
                * len(chunk)
                / len(held)
            )
    save_heads(heads, out, str(model_path))
    info = run.record(model_path, seed, minutes, history, batch_size)
    info |= {
        "num_heads": num_heads,
        "num_layers": num_layers,
        "head_params": sum(p.numel() for p in heads.parameters()),
        "held_out_top1_agreement": [round(a, 4) for a in agree.tolist()],
    }
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return info
