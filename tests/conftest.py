"""Tiny checkpoints built offline once per session (random weights + a BPE tokenizer trained on stdlib)."""

from __future__ import annotations

import gc
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run exactly, slowly, in its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from branchwise.train.tiny import build_tiny_checkpoint
from branchwise.train.tokenizer import stdlib_files, train_tokenizer

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def collect_engines():
    """Engines hold GBs of KV cache in reference cycles (strategies point back at them): collect each
    module's before the next module builds its own."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer((p.read_text(errors="ignore") for p in stdlib_files(40)), 512)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tokenizer=tokenizer))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", tokenizer=tokenizer, seed=1))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, tokenizer) -> str:
    return str(
        build_tiny_checkpoint(
            tmp_path_factory.mktemp("qwen3"), "qwen3", tokenizer=tokenizer, seed=2, head_dim=16
        )
    )


@pytest.fixture(scope="session")
def tiny_mistral_sliding(tmp_path_factory, tokenizer) -> str:
    return str(
        build_tiny_checkpoint(
            tmp_path_factory.mktemp("mistral"), "mistral", tokenizer=tokenizer, seed=3, sliding_window=12
        )
    )


@pytest.fixture(scope="session")
def spec_target(tmp_path_factory, tiny_llama) -> str:
    """A 2-layer random model whose second layer adds little, with its first layer alone saved beside it
    as `draft/` and as an MTP module: drafters that agree often, not always (speculative decoding and
    constraint tests)."""
    return with_drafters(tiny_llama, tmp_path_factory.mktemp("spec_target"))


@pytest.fixture(scope="session")
def tool_target(tmp_path_factory) -> str:
    """spec_target's shape with a tokenizer that has `<think>`, `</think>`, `<tool_call>`, `</tool_call>` as
    single tokens and the hermes/Qwen chat template (tools, tool results, thinking)."""
    tags = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
    tok = train_tokenizer((p.read_text(errors="ignore") for p in stdlib_files(40)), 512, added_tokens=tags)
    base = build_tiny_checkpoint(tmp_path_factory.mktemp("tool_base"), "llama", tokenizer=tok, seed=4)
    return with_drafters(str(base), tmp_path_factory.mktemp("tool_target"))


def with_drafters(source: str, path) -> str:
    """`source` with its second layer damped, saved at `path` with a draft model, an MTP module and Medusa
    heads beside it."""
    from transformers import AutoModelForCausalLM

    from branchwise.models.loader import load_tokenizer
    from branchwise.models.medusa import save_heads
    from branchwise.models.mtp import save_mtp

    model = AutoModelForCausalLM.from_pretrained(source)
    for proj in (model.model.layers[1].self_attn.o_proj, model.model.layers[1].mlp.down_proj):
        proj.weight.data *= 0.3
    model.save_pretrained(path)
    load_tokenizer(source).save_pretrained(path)
    save_mtp(first_layer_as_mtp(model), path / "mtp.safetensors")
    save_heads(next_token_heads(model, 3), path / "medusa", str(path))
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(path / "draft")
    return str(path)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    """16 prompts of mixed lengths (3..90 tokens) cut from stdlib source."""
    text = stdlib_files(60)[45].read_text()
    ids = tokenizer.encode(text, add_special_tokens=False)
    lengths = [3, 90, 17, 5, 64, 33, 8, 71, 12, 50, 4, 27, 81, 9, 40, 21]
    return [ids[i * 37 : i * 37 + n] for i, n in enumerate(lengths)]


def first_layer_as_mtp(model):
    """An MTP module that computes the target's first layer over the tokens (the normed embedding passes
    through eh_proj, the target's hidden state is ignored): it predicts what the one-layer model would."""
    from branchwise.models.mtp import MTPModule

    mtp = MTPModule(model)
    mtp.block.load_state_dict(model.model.layers[0].state_dict())
    mtp.shared_head.norm.load_state_dict(model.model.norm.state_dict())
    hidden = model.config.hidden_size
    with torch.no_grad():
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :hidden] = torch.eye(hidden)
        mtp.enorm.weight.fill_(float(model.model.embed_tokens.weight.pow(2).mean(-1).sqrt().mean()))
    return mtp


def next_token_heads(model, num_heads: int):
    """Medusa heads that each guess the model's own next token again (identity blocks, the model's output
    projection): right where the text repeats itself."""
    from branchwise.models.medusa import MedusaHeads

    heads = MedusaHeads(model.config.hidden_size, model.config.vocab_size, num_heads, 1)
    with torch.no_grad():
        for head in heads.heads:
            head[-1].weight.copy_(model.get_output_embeddings().weight)
    return heads
