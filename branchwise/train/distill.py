"""What the self-distillation trainers share: the frozen model writes its own training text, then a small
module (MTP layer, Medusa heads) learns from the model's distributions over it.

The model completes a set of prompts (greedy, and a quarter sampled so the module also sees the model's
less likely continuations); `fit` runs the module's AdamW loop over those rows within a time budget.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

SEQ_LEN = 512  # room for a chat with tools and its answer


def demo_prompts(n: int, seed: int) -> list[dict]:
    """Chat requests like the demo model's users send (extraction, arithmetic; half of them v2 chats with
    system prompts, earlier turns and tools) and code to continue; drawn from another seed than the
    benchmark prompts (2026), so those stay held out."""
    from branchwise.train.demo import code_windows
    from branchwise.train.demo_data import arithmetic, conversation, extraction

    rng = random.Random(seed)
    out: list[dict] = []
    for i in range(n):
        if i % 5 == 4:
            text = code_windows(rng, 1, chars=400)[0]
            out.append({"prompt": text[: rng.randrange(80, 300)]})
        elif i % 4 in (1, 3):  # the model answers the conversation's last user or tool turn itself
            messages, tools, _ = conversation(rng)
            ends = [k for k, m in enumerate(messages) if m["role"] == "assistant"] or [len(messages)]
            out.append({"messages": messages[: rng.choice(ends)], "tools": tools})
        elif i % 2:
            out.append({"messages": [{"role": "user", "content": extraction(rng)[0]}]})
        else:
            out.append({"messages": [{"role": "user", "content": arithmetic(rng)[0]}]})
    return out


def read_prompts(path: str) -> list[dict]:
    """A JSONL file of {"prompt": ...} or {"messages": [...], "tools": [...] (optional)} records."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def self_generate(
    model_path: str, prompts: list[dict], max_tokens: int, device: str, seed: int
) -> list[list[int]]:
    """prompt + the model's own completion, as token ids."""
    from branchwise import LLM, SamplingParams

    llm = LLM(model_path, device=device, max_num_seqs=64, enforce_eager=True, seed=seed)
    ids = [
        llm.chat_prompt(p["messages"], p.get("tools")) if "messages" in p else llm.encode(p["prompt"])
        for p in prompts
    ]
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=0.8 if i % 4 == 3 else 0.0, seed=seed + i)
        for i in range(len(prompts))
    ]
    outs = llm.generate(ids, params, use_tqdm=True)
    rows = [(p + list(o.outputs[0].token_ids))[:SEQ_LEN] for p, o in zip(ids, outs, strict=True)]
    del llm
    return rows


def soft_cross_entropy(logits: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions of the cross-entropy of `logits` against the model's distribution."""
    per_token = -(teacher * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
    return (per_token * valid).sum() / valid.sum().clamp(min=1)


def pad_batch(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid): the rows right-padded to one width, and 1.0 where a row has a token."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    valid = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows], device=device)
    return ids, valid


def fit(
    module: torch.nn.Module,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rows: list[list[int]],
    pad: int,
    seconds: float,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
) -> list[float]:
    """AdamW over shuffled batches of `rows` with warm-up and a cosine decay over `seconds`; bf16 autocast
    on CUDA; a progress bar with the loss. Returns the loss history."""
    device = next(module.parameters()).device
    opt = torch.optim.AdamW(module.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    start, step, history = time.monotonic(), 0, []
    order: list[int] = []
    bar = tqdm(desc=desc, unit="step", dynamic_ncols=True)
    while (elapsed := time.monotonic() - start) < seconds:
        for group in opt.param_groups:
            decay = 0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / seconds))
            group["lr"] = lr * min(1.0, (step + 1) / 50) * decay
        if len(order) < batch_size:
            order = random.Random(seed + step).sample(range(len(rows)), len(rows))
        batch = [rows[i] for i in order[:batch_size]]
        order = order[batch_size:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(*pad_batch(batch, pad, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        step += 1
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(history[-10:]) / 10:.3f}")
        bar.update(1)
    bar.close()
    return history


@dataclass
class Distillation:
    """What a trainer starts from: the frozen model (float32, SDPA) and the rows it wrote itself."""

    base: torch.nn.Module
    rows: list[list[int]]
    num_prompts: int
    device: torch.device
    started: float  # time.monotonic() at the start, generation included
    generate_s: float

    def seconds_left(self, minutes: float) -> float:
        return minutes * 60 - (time.monotonic() - self.started)

    def record(
        self, model_path: str, seed: int, minutes: float, history: list[float], batch_size: int
    ) -> dict:
        """The fields every trainer's JSON record of its run has."""
        return {
            "model": str(model_path),
            "seed": seed,
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
            "minutes": minutes,
            "prompts": self.num_prompts,
            "tokens": sum(map(len, self.rows)),
            "generate_s": round(self.generate_s, 1),
            "steps": len(history),
            "batch_size": batch_size,
            "final_loss": sum(history[-50:]) / max(1, len(history[-50:])),
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }


def prepare(
    model_path: str,
    data: str | None,
    num_prompts: int,
    prompt_seed: int,
    max_tokens: int,
    device: str,
    seed: int,
) -> Distillation:
    """The model completes the prompts (`data`, else demo tasks from `prompt_seed`), then loads frozen."""
    from transformers import AutoModelForCausalLM

    from branchwise.models.loader import resolve_device

    started = time.monotonic()
    dev = resolve_device(device)
    prompts = read_prompts(data) if data else demo_prompts(num_prompts, prompt_seed)
    rows = self_generate(model_path, prompts, max_tokens, str(dev), seed)
    generate_s = time.monotonic() - started
    log.info("self-generated %d rows (%d tokens) in %.0fs", len(rows), sum(map(len, rows)), generate_s)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    base = base.to(dev).eval().requires_grad_(False)
    return Distillation(base, rows, len(prompts), dev, started, generate_s)
