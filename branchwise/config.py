"""Validated configuration of the engine (pydantic): the same model backs CLI flags and YAML files."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MODEL = "demo"  # the embedded demo model (see branchwise/models/demo.py)
# vLLM's --speculative-config: method -> (our strategy, the field its "model" sets)
SPECULATIVE_METHODS = {
    "eagle3": ("eagle3", "eagle_model"),
    "draft_model": ("draft", "draft_model"),
    "ngram": ("ngram", None),
    "suffix": ("suffix", None),
    "mtp": ("mtp", "mtp_model"),
    "medusa": ("medusa", "medusa_heads"),
}
SPECULATIVE_KEYS = {"method", "model", "num_speculative_tokens", "suffix_decoding_max_cached_requests"}


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        DEFAULT_MODEL, description="HF checkpoint folder or hub id; 'demo' is the embedded model"
    )
    tokenizer: str | None = Field(None, description="tokenizer folder or id (default: the model's)")
    served_model_name: str | None = Field(None, description="name clients use (default: the model argument)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and KV cache dtype: auto is bfloat16 on CUDA, float32 on CPU"
    )
    device: str = Field("auto", description="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ...")
    seed: int = Field(0, description="seed of the engine's own randomness (requests without a seed)")
    max_model_len: int | None = Field(None, ge=16, description="context length (default: the model's)")
    block_size: int = Field(16, ge=1, le=256, description="tokens per KV-cache block")
    num_blocks: int | None = Field(None, ge=1, description="KV blocks (default: from gpu_memory_utilization)")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of GPU memory the engine may use"
    )
    max_num_seqs: int = Field(256, ge=1, description="most sequences running at once")
    max_num_batched_tokens: int = Field(2048, ge=16, description="most tokens fed to one forward pass")
    strategy: str = Field(
        "ar",
        description="default decoding strategy; requests may override it (ar, draft, ngram, suffix, mtp, "
        "medusa, multiverse, and any installed through the branchwise.strategies entry point group)",
    )
    draft_model: str | None = Field(
        None,
        description="draft checkpoint of the 'draft' strategy (default: a draft/ folder beside the model)",
    )
    mtp_model: str | None = Field(
        None,
        description="MTP weights of the 'mtp' strategy (default: the checkpoint's own MTP layer, else "
        "mtp.safetensors beside the model)",
    )
    medusa_heads: str | None = Field(
        None,
        description="Medusa heads of the 'medusa' strategy: a folder in the authors' layout (default: a "
        "medusa/ folder beside the model)",
    )
    eagle_model: str | None = Field(
        None,
        description="EAGLE-3 drafter of the 'eagle3' strategy: a folder in the authors' or the speculators "
        "layout (default: an eagle3/ folder beside the model)",
    )
    num_speculative_tokens: int = Field(
        16, ge=1, le=16, description="most tokens a speculative strategy drafts per step (adaptive below)"
    )
    suffix_max_cached_requests: int = Field(
        10000, ge=0, description="finished requests whose outputs the 'suffix' strategy drafts from"
    )
    suffix_max_cached_tokens: int = Field(
        1 << 22, ge=16, description="most output tokens in the 'suffix' strategy's cache (12 bytes each)"
    )
    max_constraint_seconds: float = Field(
        2.0,
        gt=0,
        description="most seconds a request's output constraint may take to compile and compute its first "
        "masks; a slower or broken one is refused with a 400",
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral", "json"] = Field(
        "auto",
        description="how the model writes tool calls; 'auto' reads it from the chat template (hermes/Qwen "
        "<tool_call>, Mistral [TOOL_CALLS], Llama 3 JSON), else 'json': a JSON array of calls",
    )
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = Field(
        None, description="split <think> text into reasoning_content / reasoning (default: no splitting)"
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="ranks the target model is split over (torch.distributed: NCCL on GPUs, gloo on CPU); "
        "the engine starts the other ranks itself",
    )
    enforce_eager: bool = Field(False, description="never capture CUDA graphs")
    async_scheduling: bool = Field(
        False,
        description="launch step n+1 before step n's tokens are read back, so the host's work overlaps the "
        "device's (vLLM's --async-scheduling); plain decoding of unconstrained requests without logprobs "
        "or logits processing, the rest steps as usual",
    )
    prefix_cache: bool = Field(True, description="share the KV blocks of common prompt prefixes")

    speculative_config: dict | None = Field(
        None,
        description='vLLM\'s speculative config as JSON, e.g. \'{"method": "eagle3", "model": PATH, '
        "\"num_speculative_tokens\": 3}': sets --strategy, the method's weights and the draft length; "
        f"methods {', '.join(SPECULATIVE_METHODS)}",
    )

    @model_validator(mode="before")
    @classmethod
    def _speculative_config(cls, data):
        """vLLM's --speculative-config, translated into our fields (a clash with them is an error)."""
        spec = data.get("speculative_config") if isinstance(data, dict) else None
        if spec is None:
            return data
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not JSON: {e}") from None
        if not isinstance(spec, dict):
            raise ValueError("speculative_config must be a JSON object")
        unknown = set(spec) - SPECULATIVE_KEYS
        if unknown:
            raise ValueError(
                f"speculative_config: unsupported keys {sorted(unknown)}; "
                f"supported: {sorted(SPECULATIVE_KEYS)}"
            )
        method = spec.get("method")
        if method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_config method {method!r}: choose from {sorted(SPECULATIVE_METHODS)}"
            )
        strategy, weights = SPECULATIVE_METHODS[method]
        mapped = {"strategy": strategy}
        if "model" in spec:
            if weights is None:
                raise ValueError(f"speculative_config: method {method!r} takes no model")
            mapped[weights] = spec["model"]
        if "num_speculative_tokens" in spec:
            mapped["num_speculative_tokens"] = spec["num_speculative_tokens"]
        if "suffix_decoding_max_cached_requests" in spec:
            mapped["suffix_max_cached_requests"] = spec["suffix_decoding_max_cached_requests"]
        data = dict(data) | {"speculative_config": spec}
        for key, value in mapped.items():
            if (
                data.get(key) is not None
                and data[key] != value
                and not (key == "strategy" and data[key] == "ar")
            ):
                raise ValueError(
                    f"speculative_config sets {key}={value!r}, but {key}={data[key]!r} was given too"
                )
            data[key] = value
        return data

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        from branchwise.strategies import strategy_class  # the registry imports the engine: not at import

        strategy_class(name)  # ValueError naming the choices, before any weights load
        return name

    @model_validator(mode="after")
    def _async_on_one_rank(self) -> EngineConfig:
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError("async_scheduling is not supported with tensor_parallel_size > 1")
        return self


class ServerConfig(EngineConfig):
    """`branchwise serve`: the engine's settings plus the HTTP server's (one flat YAML file)."""

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(
        None, description="require 'Authorization: Bearer KEY' on every route but /health and /metrics"
    )
    max_queue: int = Field(
        1024,
        ge=0,
        description="waiting sequences (prompts x n) beyond this get 503 + Retry-After",
    )
    request_timeout: float | None = Field(None, gt=0, description="seconds before a request is aborted")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="larger request bodies get 413")
    http_timeout: float = Field(
        10.0, gt=0, description="seconds a connection may take to send a request's headers or stay idle"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="server log level; debug also shows model loading progress"
    )


def load_yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}
