"""`branchwise train demo`: the embedded demo model and its draft model, trained from scratch, offline.

Reproducible from a seed and data every machine has (see demo_data.py). Arithmetic traces are trained with
the Multiverse attention rule given as data: a path's tokens see the shared prefix and their own path only,
all paths start at the same position, and the conclusion sees every path (half of the traces are also
trained plainly causal, so sequential decoding works too).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from branchwise.models.loader import load_tokenizer
from branchwise.train.demo_data import TAGS, Encoder, Example, arithmetic, extraction
from branchwise.train.tokenizer import stdlib_files, train_tokenizer

log = logging.getLogger(__name__)

# the GPU trains a larger model for longer; the CPU budget (60 minutes on 2 cores) sees ~10M tokens, which
# a smaller model uses better. Drafts have about a tenth of their target's parameters.
TARGET = {
    "cuda": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "cpu": dict(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
    ),
}
DRAFT = {
    "cuda": dict(
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "cpu": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
}
VOCAB = 2048
SEQ_LEN = 640  # a chat with all three tools is ~600 tokens
# v2: most examples are chats (system prompts, earlier turns, tools, open-ended values, negative results);
# single-turn v1 tasks and code keep what the model already knows
MIX = {"code": 0.05, "extraction": 0.03, "arithmetic": 0.07, "chat": 0.85}


def held_out(path: Path) -> bool:
    """Every 10th stdlib file (by name order) is kept out of training: code perplexity is measured on it."""
    return hash_name(path.name) % 10 == 0


def hash_name(name: str) -> int:
    return sum(ord(c) * (i + 1) for i, c in enumerate(name))


def code_windows(rng: random.Random, n: int, chars: int = 900) -> list[str]:
    files = [p for p in stdlib_files() if not held_out(p)]
    out = []
    while len(out) < n:
        text = rng.choice(files).read_text(errors="ignore")
        at = rng.randrange(max(1, len(text) - chars))
        out.append(text[at : at + chars])
    return out


def build_tokenizer(seed: int, samples: int = 3000):
    rng = random.Random(seed)
    texts = code_windows(rng, samples)
    for _ in range(samples):
        m, a, _ = extraction(rng)
        texts.append(f"{m}\n{a}")
        m, paths, c, ans = arithmetic(rng)
        texts.append(m + "".join(p for _, p in paths) + c + str(ans))
    return train_tokenizer(texts, VOCAB, added_tokens=TAGS, split_digits=True)


_ENCODER: Encoder | None = None


def _init_worker(tokenizer_json: str) -> None:
    from transformers import PreTrainedTokenizerFast

    global _ENCODER
    _ENCODER = Encoder(PreTrainedTokenizerFast.from_pretrained(tokenizer_json))


def _examples(args: tuple[int, int]) -> list[Example]:
    seed, n = args
    rng = random.Random(seed)
    code = iter(code_windows(rng, n))
    out = []
    for _ in range(n):
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if kind == "code":
            out.append(_ENCODER.code(next(code)))
        elif kind == "extraction":
            out.append(_ENCODER.extraction(rng))
        elif kind == "arithmetic":
            out.append(_ENCODER.arithmetic(rng, parallel=rng.random() < 0.5))
        else:
            while len((ex := _ENCODER.conversation(rng)).ids) > SEQ_LEN:  # never cut off an answer
                pass
            out.append(ex)
    return out


def make_dataset(tokenizer_dir: str, num_examples: int, seed: int, workers: int) -> dict[str, np.ndarray]:
    """Examples packed into (rows, SEQ_LEN) arrays: ids, positions, example ids, paths, after, targets."""
    chunks = [
        (seed * 1_000_003 + i, min(2000, num_examples - i * 2000)) for i in range(-(-num_examples // 2000))
    ]
    with mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir,)) as pool:
        examples = [e for chunk in pool.map(_examples, chunks) for e in chunk]
    random.Random(seed).shuffle(examples)
    rows, row, used = [], [], 0
    for ex in examples:
        ex = Example(*(getattr(ex, f)[:SEQ_LEN] for f in ("ids", "loss", "path", "after", "pos")))
        if used + len(ex.ids) > SEQ_LEN:
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += len(ex.ids)
    rows.append(row)
    arrays = {
        k: np.zeros((len(rows), SEQ_LEN), dtype=np.int32)
        for k in ("ids", "pos", "ex", "path", "after", "loss")
    }
    arrays["ex"][:] = -1
    for r, row in enumerate(rows):
        at = 0
        for e, ex in enumerate(row):
            n = len(ex.ids)
            for key, values in (
                ("ids", ex.ids),
                ("pos", ex.pos),
                ("path", ex.path),
                ("after", ex.after),
                ("loss", ex.loss),
            ):
                arrays[key][r, at : at + n] = values
            arrays["ex"][r, at : at + n] = e
            at += n
    return arrays


def visibility(ex: torch.Tensor, path: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: same example, causal in the flattened order, and the Multiverse path rule."""
    L = ex.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=ex.device).tril()
    same = (ex[:, :, None] == ex[:, None, :]) & (ex[:, :, None] >= 0)
    paths = (path[:, None, :] == 0) | (path[:, :, None] == path[:, None, :]) | (after[:, :, None] == 1)
    mask = same & paths & causal
    mask |= torch.eye(L, dtype=torch.bool, device=ex.device)  # padding sees itself: no empty rows
    return mask[:, None]


def train_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Training-time attention: dense SDPA with the batch's visibility mask (passed as `train_mask`)."""
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=kwargs["train_mask"],
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2), None


AttentionInterface.register("branchwise_train", train_attention)


def batch_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["ids"].long()
    mask = visibility(batch["ex"], batch["path"], batch["after"])
    logits = model(input_ids=ids, position_ids=batch["pos"].long(), train_mask=mask, use_cache=False).logits
    # token i+1 is the target of position i when it is marked as a target and belongs to the same example
    weight = (batch["loss"][:, 1:] == 1) & (batch["ex"][:, 1:] == batch["ex"][:, :-1])
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return (losses * weight.flatten()).sum() / weight.sum().clamp(min=1)


def new_model(shape: dict, tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="branchwise_train",
        **shape,
    )
    return LlamaForCausalLM(config)


def train(
    model,
    data: dict[str, np.ndarray],
    seconds: float,
    device: torch.device,
    batch_size: int,
    lr: float,
    desc: str,
    save=None,
    save_every: float = 60.0,
    max_steps: int | None = None,
) -> list[float]:
    """AdamW with warm-up and a cosine decay over the time budget; returns the loss history."""
    model.to(device).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05, fused=device.type == "cuda"
    )
    arrays = {k: torch.from_numpy(v) for k, v in data.items()}
    rows = arrays["ids"].shape[0]
    order = torch.randperm(rows)
    start = last_save = time.monotonic()
    step, at, tokens, history = 0, 0, 0, []
    bar = tqdm(desc=desc, unit="step", dynamic_ncols=True)
    while (elapsed := time.monotonic() - start) < seconds and step != max_steps:
        frac = elapsed / seconds
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        if at + batch_size > rows:
            order, at = torch.randperm(rows), 0
        idx = order[at : at + batch_size]
        at += batch_size
        batch = {k: v[idx].to(device, non_blocking=True) for k, v in arrays.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):  # CPUs with AMX gain ~20 % too
            loss = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int((batch["ex"] >= 0).sum())
        history.append(loss.item())
        if step % 10 == 0:
            loss_avg = sum(history[-10:]) / 10
            bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tokens / (time.monotonic() - start):,.0f}")
        bar.update(1)
        if save is not None and time.monotonic() - last_save > save_every:
            save(model)
            last_save = time.monotonic()
    bar.close()
    return history


def resume(path: Path) -> LlamaForCausalLM:
    """A saved demo checkpoint in fp32 with the training attention, to train further."""
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="branchwise_train")


def save_model(model, tokenizer, out: Path) -> None:
    """A bf16 copy in the standard Llama layout, loadable by any transformers (no training attention)."""
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        **{k: v for k, v in model.config.to_dict().items() if "attn_implementation" not in k}
    )
    copy = LlamaForCausalLM(config).to(torch.bfloat16)
    copy.load_state_dict({k: v.detach().to(torch.bfloat16).cpu() for k, v in model.state_dict().items()})
    copy.generation_config.eos_token_id = config.eos_token_id
    copy.generation_config.pad_token_id = config.pad_token_id
    copy.save_pretrained(out)
    tokenizer.save_pretrained(out)


def train_demo(
    out: Path,
    minutes: float,
    device: str,
    seed: int = 0,
    examples: int | None = None,
    workers: int | None = None,
    init: Path | None = None,
) -> dict:
    """Train the demo model (into `out`) and its draft model (into `out/draft`) within `minutes`;
    `init`: continue from a demo checkpoint (its tokenizer, shapes and weights) at a lower learning rate."""
    start = time.monotonic()
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    gpu = dev.type == "cuda"
    workers = workers or max(1, min(16, mp.cpu_count()))
    examples = examples or (600_000 if gpu else 60_000)
    tokenizer = load_tokenizer(str(init)) if init else build_tokenizer(seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    data = make_dataset(str(out), examples, seed, workers)
    log.info("dataset: %d rows of %d tokens in %.0fs", len(data["ids"]), SEQ_LEN, time.monotonic() - start)
    left = minutes * 60 - (time.monotonic() - start)
    scale = (0.5 if gpu else 0.33) if init else 1.0
    target = resume(init) if init else new_model(TARGET[dev.type], tokenizer, seed)
    history = train(
        target,
        data,
        0.85 * left,
        dev,
        64 if gpu else 16,
        scale * (2e-3 if gpu else 3e-3),
        "demo model",
        save=lambda m: save_model(m, tokenizer, out),
    )
    save_model(target, tokenizer, out)
    draft = resume(init / "draft") if init else new_model(DRAFT[dev.type], tokenizer, seed + 1)
    draft_history = train(
        draft,
        data,
        minutes * 60 - (time.monotonic() - start),
        dev,
        64 if gpu else 16,
        scale * 3e-3,
        "draft model",
    )
    save_model(draft, tokenizer, out / "draft")
    info = {
        "seed": seed,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "minutes": minutes,
        "init": str(init) if init else None,
        "examples": examples,
        "rows": int(len(data["ids"])),
        "seq_len": SEQ_LEN,
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "final_loss": float(np.mean(history[-200:])) if history else None,
        "draft_final_loss": float(np.mean(draft_history[-200:])) if draft_history else None,
        "elapsed_s": time.monotonic() - start,
    }
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return info
