"""OpenAI request/response bodies (pydantic), with vLLM's extra sampling fields and our `strategy`."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from branchwise.constraints import Constraint
from branchwise.engine.sequence import SamplingParams


class StrategyChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    """Fields both routes share; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    strategy: StrategyChoice | str | None = None
    # constrained output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    def strategy_choice(self) -> tuple[str | None, dict]:
        if isinstance(self.strategy, str):
            return self.strategy, {}
        if self.strategy is None:
            return None, {}
        return self.strategy.name, self.strategy.params

    def constraint(self) -> tuple[Constraint | None, str | None]:
        """(the request's output constraint, the field it came from); ValueError if malformed."""
        found: list[tuple[str, Constraint]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                found.append(("response_format", Constraint("json_object")))
            elif kind == "json_schema":
                spec = rf.get("json_schema") or {}
                if "schema" not in spec:
                    raise ValueError("response_format.json_schema.schema is required")
                lenient = bool(spec.get("lenient", False))
                found.append(("response_format", Constraint.json_schema(spec["schema"], lenient)))
            elif kind != "text":
                raise ValueError(f"response_format type {kind!r} is not supported")
        so = dict(self.structured_outputs or {})
        lenient = bool(so.pop("lenient", False))
        for key, value in so.items():
            if value is None or value is False:
                continue
            if key not in STRUCTURED_KINDS:
                raise ValueError(f"structured_outputs.{key} is not supported")
            found.append((f"structured_outputs.{key}", _constraint(key, value, lenient)))
        for key in STRUCTURED_KINDS:
            value = getattr(self, f"guided_{key}", None)
            if value is not None:
                found.append((f"guided_{key}", _constraint(key, value, False)))
        if len(found) > 1:
            raise ValueError(f"give one output constraint, got {[name for name, _ in found]}")
        return (found[0][1], found[0][0]) if found else (None, None)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty or 1.0,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _constraint(kind: str, value: Any, lenient: bool) -> Constraint:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
        return Constraint.json_schema(value, lenient)
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "choice":
        return Constraint.choice(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string")
    return Constraint(kind, value)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ValueError(f"content parts of type {part.get('type')!r} are not supported")
                parts.append(part.get("text", ""))
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, status: int, type_: str, param: str | None = None) -> dict:
    """OpenAI's error shape; like vLLM we put the HTTP status in `code`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}
