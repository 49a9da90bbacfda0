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
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from branchwise.models.loader import decoder_of, resolve_device
from branchwise.models.mtp import OWN_FILE, MTPModule, save_mtp
from branchwise.train.distill import demo_prompts, fit, read_prompts, self_generate

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
        logp = F.log_softmax(module.logits(x).float(), dim=-1)
        per_token = -(teacher * logp).sum(-1)
        loss = loss + weight * (per_token * valid).sum() / valid.sum().clamp(min=1)
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
) -> dict:
    """Train an MTP module for the model at `model_path` within `minutes`; writes `out` (default:
    mtp.safetensors beside the model) and a JSON record of the run beside it."""
    start = time.monotonic()
    dev = resolve_device(device)
    out = out or Path(model_path) / OWN_FILE
    prompts = read_prompts(data) if data else demo_prompts(num_prompts, seed + 7)
    rows = self_generate(model_path, prompts, max_tokens, str(dev), seed)
    generated_s = time.monotonic() - start
    log.info("self-generated %d rows (%d tokens) in %.0fs", len(rows), sum(map(len, rows)), generated_s)

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    base = base.to(dev).eval().requires_grad_(False)
    module = new_module(base).to(dev).train()
    module.set_attention("sdpa")
    pad = base.config.pad_token_id or 0
    seconds = minutes * 60 - (time.monotonic() - start)
    history = fit(
        module,
        lambda ids, valid: mtp_loss(base, module, ids, valid),
        rows,
        pad,
        seconds,
        batch_size,
        lr,
        seed,
        "mtp module",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_mtp(module.eval(), out)
    info = {
        "model": str(model_path),
        "seed": seed,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "minutes": minutes,
        "prompts": len(prompts),
        "tokens": sum(map(len, rows)),
        "generate_s": round(generated_s, 1),
        "steps": len(history),
        "batch_size": batch_size,
        "module_params": sum(p.numel() for p in module.parameters()),
        "final_loss": sum(history[-50:]) / max(1, len(history[-50:])),
        "elapsed_s": round(time.monotonic() - start, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info
