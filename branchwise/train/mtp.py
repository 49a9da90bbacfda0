"""`branchwise train mtp`: an MTP module for a frozen model, by self-distillation.

The model writes its own training text: it completes a set of prompts (greedy, and a quarter sampled so the
module also sees the model's less likely continuations), then the module learns, at every position, the
model's own next-token distribution one step further ahead than the model's hidden state there. The
module is trained at depth 1 (the target's hidden state) and depth 2 (its own output), as the strategy
applies it. The result is written in DeepSeek-V3's layout (`mtp.safetensors` beside the model).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from branchwise.models.loader import decoder_of
from branchwise.models.mtp import OWN_FILE, MTPModule, find_mtp, load_mtp, save_mtp
from branchwise.train.distill import fit, prepare, soft_cross_entropy

log = logging.getLogger(__name__)

DEPTH2_WEIGHT = 0.5


def new_module(base: torch.nn.Module) -> MTPModule:
    """A module that starts close to the identity on the target's hidden state: the block is a copy of
    the target's last layer and the projection passes the hidden half through."""
    module = MTPModule(base)
    decoder = decoder_of(base)
    module.block.load_state_dict(decoder.layers[-1].state_dict())
    module.shared_head.norm.load_state_dict(decoder.norm.state_dict())
    hidden = base.config.hidden_size
    with torch.no_grad():
        module.eh_proj.weight.normal_(0, 0.02 / math.sqrt(hidden))
        module.eh_proj.weight[:, hidden:] += torch.eye(hidden)
    return module


def mtp_loss(base, module: MTPModule, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of the module against the base's next-token distributions, depth 1 and 2."""
    with torch.no_grad():
        hidden = decoder_of(base)(input_ids=ids, use_cache=False).last_hidden_state
        teacher = F.softmax(base.get_output_embeddings()(hidden).float(), dim=-1)
    positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
    zeros = torch.zeros_like(hidden[:, :1])
    # entry j reads the hidden state of position j - 1 and token j; it predicts token j + 1, whose
    # distribution under the base is the teacher's row j
    x1 = module(ids, torch.cat([zeros, hidden[:, :-1]], 1), positions)
    x2 = module(ids, torch.cat([zeros.to(x1.dtype), x1[:, :-1]], 1), positions)
    loss = 0.0
    for x, weight in ((x1, 1.0), (x2, DEPTH2_WEIGHT)):
        loss = loss + weight * soft_cross_entropy(module.logits(x), teacher, valid)
    return loss


def train_mtp(
    model_path: str,
    out: Path | None = None,
    minutes: float = 10.0,
    device: str = "auto",
    seed: int = 0,
    num_prompts: int = 2000,
    max_tokens: int = 160,
    data: str | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    init: str | None = None,
) -> dict:
    """Train an MTP module for the model at `model_path` within `minutes`; writes `out` (default:
    mtp.safetensors beside the model) and a JSON record of the run beside it. `init`: an MTP file to
    continue from (e.g. the module of the model's previous weights)."""
    out = out or Path(model_path) / OWN_FILE
    run = prepare(model_path, data, num_prompts, seed + 7, max_tokens, device, seed)
    if init:
        found = find_mtp(str(Path(init).parent), init)
        module = load_mtp(run.base, *found).float().requires_grad_(True).train()
    else:
        module = new_module(run.base).to(run.device).train()
    module.set_attention("sdpa")
    history = fit(
        module,
        lambda ids, valid: mtp_loss(run.base, module, ids, valid),
        run.rows,
        run.base.config.pad_token_id or 0,
        run.seconds_left(minutes),
        batch_size,
        lr,
        seed,
        "mtp module",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_mtp(module.eval(), out)
    info = run.record(model_path, seed, minutes, history, batch_size)
    info["module_params"] = sum(p.numel() for p in module.parameters())
    out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info
