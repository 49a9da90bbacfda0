"""Tiny random checkpoints built offline: the test models, and the default model until a demo is shipped."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from branchwise.train.tokenizer import stdlib_files, train_tokenizer

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}


def build_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    init_std: float = 0.2,
    tokenizer=None,
    **extra,
) -> Path:
    """Save a random `arch` model with a BPE tokenizer trained on stdlib source; returns the folder.

    A large init_std makes the random model's next-token distributions peaked, so greedy decoding is not
    decided by float rounding between near-tied logits.
    """
    path = Path(path)
    if tokenizer is None:
        tokenizer = train_tokenizer((p.read_text(errors="ignore") for p in stdlib_files(40)), vocab_size)
    config = CONFIGS[arch](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
