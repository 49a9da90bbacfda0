"""Chat completions: the conversation (tool calls and their results too) through the model's chat
template; the request's output constraint, tool calls and reasoning composed into one grammar, so that
every strategy enforces them the way it enforces any constraint; the output read back into OpenAI's
message (content, reasoning, tool calls), whole or as streamed deltas.

`plan_chat`, `read_output` and `ChatStream` take plain OpenAI-shaped dicts: the offline `LLM.chat` uses
them as the HTTP route does.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from branchwise.constraints import Constraint, as_lark
from branchwise.engine.sequence import InvalidRequest, SeqUpdate
from branchwise.server.protocol import ChatCompletionRequest, new_id, now
from branchwise.server.reasoning import ReasoningParser, ReasoningStream, reasoning_parser_for
from branchwise.server.serving import APIError, Choice, Serving, usage_of
from branchwise.server.tool_parsers import (
    Call,
    CallStream,
    MistralParser,
    ToolParser,
    call_schema,
    choice_mode,
    parser_for,
)


@dataclass
class ChatPlan:
    """What one chat request becomes before it reaches the engine, and how to read its output."""

    prompt_text: str
    constraint: Constraint | None  # the output's grammar: format, tool calls, after any reasoning
    tools: ToolParser | None  # reads calls from the output (tool_choice other than none)
    reasoning: ReasoningParser | None
    think_state: str  # where the prompt leaves the output: inside, after or before a think block
    keep_special: bool  # a marker is a special token: decoded text must keep special tokens


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI's messages as chat templates read them: developer is system, a call's arguments an object."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        m["role"] = "system" if m["role"] == "developer" else m["role"]
        m.setdefault("content", "")
        if "reasoning" in m:
            m.setdefault("reasoning_content", m.pop("reasoning"))
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def _arguments(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"a tool call's `arguments` is not JSON: {e}") from e


def plan_chat(
    tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    tool_choice: tuple[str | None, str | None] = (None, None),
    parallel_tool_calls: bool = True,
    fmt: Constraint | None = None,
    template_kwargs: dict | None = None,
    tool_call_parser: str | None = "auto",
    reasoning_parser: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> ChatPlan:
    """Render the conversation and build its grammar; ValueError (a 400) for what cannot be done."""
    try:
        text = tokenizer.apply_chat_template(
            template_messages(messages),
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **(template_kwargs or {}),
        )
    except ValueError:
        raise
    except Exception as e:  # the template's own checks (roles must alternate, ...) speak to the client
        raise ValueError(f"the chat template cannot render these messages: {e}") from e
    reasoning = reasoning_parser_for(reasoning_parser, tokenizer)
    state = reasoning.state_after(text) if reasoning is not None else "after"
    mode, named = tool_choice
    parser = parser_for(tool_call_parser, tokenizer) if mode else None
    rules = None
    if mode:
        functions = [t["function"] for t in tools if mode != "named" or t["function"]["name"] == named]
        calls_mode = "auto" if mode == "auto" and fmt is None else "required"
        parallel = parallel_tool_calls and mode != "named"
        rules = parser.grammar(call_schema(functions, parser.args_key), calls_mode, parallel)
        if fmt is not None and mode == "auto":  # either an answer in the format or calls
            rules = rules.replace("body:", "calls:", 1) + f"body: answer | calls\nanswer: {as_lark(fmt)}\n"
        elif fmt is not None:
            message = "response_format applies to answers; with tool_choice required or named, give none"
            raise InvalidRequest(message, "response_format")
    elif fmt is not None and reasoning is not None:
        rules = f"body: {as_lark(fmt)}\n"
    constraint = fmt if rules is None else None
    if rules is not None:
        head = "start: reasoning body\n" + reasoning.grammar(state) if reasoning else "start: body\n"
        constraint = Constraint("grammar", head + rules)
    markers = [m for m in (getattr(parser, "opener", None), getattr(parser, "closer", None)) if m]
    if reasoning is not None:
        markers += ["<think>", "</think>"]
    special = set(tokenizer.all_special_tokens)
    keep_special = any(m in special for m in markers) or isinstance(parser, MistralParser)
    return ChatPlan(text, constraint, parser, reasoning, state, keep_special)


def read_output(plan: ChatPlan, text: str) -> tuple[str | None, str, list[Call]]:
    """(reasoning or None, content, finished tool calls) of a whole output."""
    reasoning = None
    if plan.reasoning is not None:
        reasoning, text = plan.reasoning.split(text, plan.think_state, final=True)
    calls: list[Call] = []
    if plan.tools is not None:
        text, calls = plan.tools.parse(text)
    return reasoning, text, calls


def call_id(plan: ChatPlan) -> str:
    if isinstance(plan.tools, MistralParser):  # Mistral's templates take 9 alphanumerics
        return uuid.uuid4().hex[:9]
    return f"call_{uuid.uuid4().hex[:24]}"


def message_of(plan: ChatPlan, text: str) -> tuple[dict, bool]:
    """OpenAI's assistant message of a whole output, and whether it holds tool calls."""
    reasoning, content, calls = read_output(plan, text)
    message = {"role": "assistant", "content": content if content or not calls else None}
    if plan.reasoning is not None:  # both names: vLLM renamed the field, other servers kept it
        message["reasoning_content"] = message["reasoning"] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": call_id(plan), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
    return message, bool(calls)


class ChatStream:
    """Deltas of OpenAI's chat message from a growing output: reasoning, content, tool calls."""

    def __init__(self, plan: ChatPlan) -> None:
        self.reasoning = ReasoningStream(plan.reasoning, plan.think_state) if plan.reasoning else None
        self.calls = CallStream(plan.tools, lambda: call_id(plan)) if plan.tools else None
        self.num_calls = 0

    def feed(self, text: str, final: bool) -> dict:
        delta: dict = {}
        content = text
        if self.reasoning is not None:
            thought, content = self.reasoning.feed(text, final)
            if thought:
                delta["reasoning_content"] = delta["reasoning"] = thought
        if self.calls is not None:
            content, calls = self.calls.feed(content, final)
            if calls:
                delta["tool_calls"] = calls
            self.num_calls = len(self.calls.ids)
        if content:
            delta["content"] = content
        return delta


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


async def create_chat_completion(s: Serving, req: ChatCompletionRequest, request: Request):
    s.check_model(req.model)
    if not s.tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    for m in req.messages:
        s.check_length(m.content or "", "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if s.engine.config.reasoning_parser:
        for flag in ("separate_reasoning", "stream_reasoning"):
            if not getattr(req, flag):
                raise APIError(
                    400, f"`{flag}: false` is not supported: reasoning is always split", param=flag
                )
    try:
        params = req.sampling_params(req.max_completion_tokens or req.max_tokens, logprobs)
        fmt, param = req.constraint()
        config = s.engine.config
        plan = plan_chat(
            s.tokenizer,
            [m.model_dump(exclude_none=True) for m in req.messages],
            [t.model_dump(exclude_none=True) for t in req.tools or []],
            choice_mode(req.tools, req.model_dump(include={"tool_choice"})["tool_choice"]),
            req.parallel_tool_calls,
            fmt,
            req.chat_template_kwargs,
            config.tool_call_parser,
            config.reasoning_parser,
            req.add_generation_prompt,
            req.continue_final_message,
        )
    except ValueError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None) or "messages") from e
    params.skip_special_tokens = params.skip_special_tokens and not plan.keep_special
    param = "tools" if plan.constraint is not None and plan.constraint is not fmt else param
    report = await s.constrain(params, plan.constraint, param)
    prompt = s.encode(plan.prompt_text, "messages", special=False)
    rids = s.submit([prompt], params, req)
    head = {
        "id": new_id("chatcmpl"),
        "object": "chat.completion.chunk",
        "created": now(),
        "model": s.model_name,
    }
    head |= report

    if req.stream:
        streams = [ChatStream(plan) for _ in range(req.n)]

        def opening(index: int) -> dict:
            delta = {"role": "assistant", "content": ""}
            return head | {
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]
            }

        def chunk(c: Choice, u: SeqUpdate, offset: int) -> dict | None:
            stream = streams[c.index]
            delta = stream.feed(u.text, final=u.finish_reason is not None)
            lp = s.chat_logprobs(u.logprobs) if logprobs is not None else None
            reason = finish_reason(u.finish_reason, stream.num_calls > 0)
            if not delta and reason is None and lp is None:
                return None
            return head | {
                "choices": [{"index": c.index, "delta": delta, "finish_reason": reason, "logprobs": lp}]
            }

        events = s.stream(rids, req.n, [len(prompt)], req, head, chunk, opening)
        return StreamingResponse(events, media_type="text/event-stream")
    choices = await s.collect(request, rids, req.n)
    out = []
    for c in choices:
        message, has_calls = message_of(plan, c.text)
        out.append(
            {
                "index": c.index,
                "message": message,
                "finish_reason": finish_reason(c.finish_reason, has_calls),
                "logprobs": s.chat_logprobs(c.logprobs) if logprobs is not None else None,
            }
        )
    return head | {
        "object": "chat.completion",
        "choices": out,
        "usage": usage_of(choices, [len(prompt)], req.n),
    }
