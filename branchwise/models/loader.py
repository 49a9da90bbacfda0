"""Loading Hugging Face checkpoints (a local folder or a hub id) to run on our paged attention."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from branchwise.models.attention import ATTENTION_NAME
from branchwise.models.fused import fuse_projections

log = logging.getLogger(__name__)

TESTED_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, honouring a generic fast-tokenizer class saved beside a typed config.

    `AutoTokenizer` builds the model type's own tokenizer class for e.g. a qwen2 folder, which can give
    other ids than the saved tokenizer.json of a tokenizer trained with `tokenizers`.
    """
    config_file = Path(path) / "tokenizer_config.json"
    if config_file.exists():
        cls = json.loads(config_file.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_model(
    path: str, dtype: torch.dtype, device: torch.device, tensor_parallel: bool = False
) -> torch.nn.Module:
    """A causal LM whose attention layers call our paged attention, projections fused where supported;
    HF's KV cache stays off. `tensor_parallel`: this rank's shard, by transformers' tp plan, over the
    initialised process group (every rank calls it at once; see engine/tensor_parallel.py)."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in TESTED_ARCHITECTURES:
        log.warning(
            "architecture %r is untested; tested: %s", config.model_type, sorted(TESTED_ARCHITECTURES)
        )
    reduce, shard = None, {}
    if tensor_parallel:
        import torch.distributed as dist

        from branchwise.engine import tensor_parallel as tp

        reduce, shard = tp.all_reduce, {"tp_plan": "auto", "tp_size": dist.get_world_size()}
        try:  # transformers >= 5.18 takes the plan in a DistributedConfig
            from transformers import DistributedConfig

            shard = {"distributed_config": DistributedConfig(**shard)}
        except ImportError:
            pass
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=ATTENTION_NAME, **shard
    )
    if tensor_parallel:
        tp.local_shards(model)
    model.config.use_cache = False
    model = model.to(device).eval().requires_grad_(False)
    fuse_projections(model, reduce)
    return model


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer stack (`model.model` for Llama-likes): returns final-normed hidden states."""
    return getattr(model, model.base_model_prefix)


def kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a model's attention."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim
