"""OpenAI request/response bodies (pydantic), with vLLM's extra sampling fields and our `strategy`."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from branchwise.constraints import Constraint
from branchwise.engine.sequence import REPETITION_PENALTY_RANGE, SEED_RANGE, SamplingParams


class Strict(BaseModel):
    """A request body part: unknown fields and non-finite numbers are a 400, never silently dropped."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


class StrategyChoice(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JSONSchemaFormat(Strict):
    model_config = ConfigDict(populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None
    lenient: bool = False  # ours: ignore keywords llguidance cannot enforce (the response says which)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: at most one kind of constraint."""

    model_config = ConfigDict(populate_by_name=True)
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    lenient: bool = False


class _SamplingFields(Strict):
    """Fields both routes share. Every field that changes the output is honoured; unknown ones are a 400."""

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    no_stop_trim: bool = False  # SGLang's name for include_stop_str_in_output (its router sends it)
    skip_special_tokens: bool = True
    return_hidden_states: bool = False  # SGLang's; only its default is served
    stream: bool = False
    stream_options: StreamOptions | None = None
    strategy: StrategyChoice | str | None = None
    # constrained output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # metadata OpenAI's clients may send: nothing about the output depends on it
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("return_hidden_states")
    @classmethod
    def _no_hidden_states(cls, v):
        if v:
            raise ValueError("return_hidden_states is not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, value in (v or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values must be in [-100, 100], got {value}")
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
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", Constraint("json_object")))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ValueError("response_format.json_schema.schema is required")
            spec = rf.json_schema
            found.append(("response_format", Constraint.json_schema(spec.schema_, spec.lenient)))
        so = self.structured_outputs
        if so is not None:
            for key in STRUCTURED_KINDS:
                value = getattr(so, "json_" if key == "json" else key)
                if value is not None and value is not False:
                    found.append((f"structured_outputs.{key}", _constraint(key, value, so.lenient)))
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
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output or self.no_stop_trim,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            output_kind="delta" if self.stream else "final_only",
        )


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _constraint(kind: str, value: Any, lenient: bool) -> Constraint:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
        if value is True:
            value = None  # `true`: any JSON value vLLM-style; we take any object, as json_object does
        if not isinstance(value, dict | None):
            raise ValueError("a JSON schema must be an object")
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
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and (len(v) == 0 or any(isinstance(x, list | str) and not x for x in v)):
            raise ValueError("prompt must not be empty")
        return v


class Function(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(Strict):
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, earlier in the conversation
    tool_call_id: str | None = None  # a tool message answers this call
    reasoning_content: str | None = None  # an assistant's earlier thinking (either name)
    reasoning: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        """Content parts of type text, joined; any other part type is a 400."""
        if not isinstance(v, list):
            return v
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content part {i}: parts of type {kind!r} are not supported, only 'text'")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i}: `text` must be a string")
            texts.append(part["text"])
        return "".join(texts)

    @model_validator(mode="after")
    def _roles(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the `tool_call_id` it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry `tool_calls`")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # extend the last (assistant) message instead of starting one
    # SGLang's reasoning switches (its router sends the defaults): off is refused where a parser is on
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}

    @model_validator(mode="after")
    def _tools(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs `tools`")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names `{choice.function.name}`, which is not among the tools")
        return self


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def error_body(message: str, status: int, type_: str, param: str | None = None) -> dict:
    """OpenAI's error shape; like vLLM we put the HTTP status in `code`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}
