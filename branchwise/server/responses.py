"""POST /v1/responses (OpenAI's Responses API) over the chat machinery: input items become chat messages,
`text.format` and function tools become the same grammar chat builds, and the output comes back as
reasoning, message and function_call items, whole or as OpenAI's event stream. `store` keeps a bounded
number of responses in memory for `previous_response_id` and GET /v1/responses/{id}."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from branchwise.constraints import Constraint
from branchwise.engine.sequence import REPETITION_PENALTY_RANGE, SamplingParams
from branchwise.server.chat import ChatPlan, ChatStream, call_id, plan_chat, read_output
from branchwise.server.protocol import StrategyChoice, Strict, new_id, now
from branchwise.server.serving import APIError, Choice, Serving, sse
from branchwise.server.tool_parsers import choice_mode

MAX_STORED = 1000


class TextPart(Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list | None = None


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    status: str | None = None


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # only the default: nothing else is done


class ResponsesRequest(Strict):
    model: str | None = None
    input: str | list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(
        None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1]
    )
    seed: int | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    truncation: Literal["disabled"] | None = None
    strategy: StrategyChoice | str | None = None
    # metadata: nothing about the output depends on it
    user: str | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def strategy_choice(self) -> tuple[str | None, dict]:
        if isinstance(self.strategy, str) or self.strategy is None:
            return self.strategy, {}
        return self.strategy.name, self.strategy.params


def chat_messages(req: ResponsesRequest, history: list[dict]) -> list[dict]:
    """The conversation as chat messages: the stored one, the instructions, then the input items."""
    messages = list(history)
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    thought = None
    for item in items:
        if isinstance(item, MessageItem):
            text = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
            messages.append({"role": item.role, "content": text})
            if item.role == "assistant" and thought is not None:
                messages[-1]["reasoning_content"], thought = thought, None
        elif isinstance(item, ReasoningItem):
            thought = "".join(c.text for c in item.content or [])
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or not last.get("pending_calls", False):
                last = {"role": "assistant", "content": "", "tool_calls": [], "pending_calls": True}
                if thought is not None:
                    last["reasoning_content"], thought = thought, None
                messages.append(last)
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    for m in messages:
        m.pop("pending_calls", None)
    return messages


def output_items(plan: ChatPlan, text: str) -> list[dict]:
    reasoning, content, calls = read_output(plan, text)
    items = []
    if reasoning:
        items.append(reasoning_item(new_id("rs"), reasoning, "completed"))
    if content or not calls:
        items.append(message_item(new_id("msg"), content, "completed"))
    for c in calls:
        items.append(call_item(new_id("fc"), call_id(plan), c.name, c.arguments, "completed"))
    return items


def reasoning_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def message_item(item_id: str, text: str, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def as_message(items: list[dict]) -> dict:
    """The response's output as one assistant chat message (what a later turn's history holds)."""
    message: dict = {"role": "assistant", "content": ""}
    for item in items:
        if item["type"] == "reasoning":
            message["reasoning_content"] = item["content"][0]["text"]
        elif item["type"] == "message":
            message["content"] = item["content"][0]["text"]
        else:
            call = {"id": item["call_id"], "type": "function"}
            call["function"] = {"name": item["name"], "arguments": item["arguments"]}
            message.setdefault("tool_calls", []).append(call)
    return message


class Responses:
    """The /v1/responses surface: its store and its handler."""

    def __init__(self, s: Serving) -> None:
        self.s = s
        self.stored: OrderedDict[str, tuple[list[dict], dict]] = OrderedDict()

    def get(self, response_id: str) -> dict:
        if response_id not in self.stored:
            raise APIError(404, f"No response with id '{response_id}' is stored.", "not_found_error", "id")
        return self.stored[response_id][1]

    async def create(self, req: ResponsesRequest, request: Request):
        s = self.s
        s.check_model(req.model)
        history: list[dict] = []
        if req.previous_response_id is not None:
            if req.previous_response_id not in self.stored:
                message = f"No stored response with id '{req.previous_response_id}'."
                raise APIError(400, message, param="previous_response_id")
            history = self.stored[req.previous_response_id][0]
        tools = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in req.tools or []
        ]
        choice = req.tool_choice
        if isinstance(choice, NamedFunction):
            choice = {"type": "function", "function": {"name": choice.name}}
        try:
            messages = chat_messages(req, history)
            params = SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                min_p=req.min_p or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0,
                seed=req.seed,
                max_tokens=req.max_output_tokens,
                output_kind="delta" if req.stream else "final_only",
            )
            fmt = req.text.format if req.text else None
            constraint = None
            if fmt is not None and fmt.type == "json_schema":
                if fmt.schema_ is None:
                    raise ValueError("text.format.schema is required")
                constraint = Constraint.json_schema(fmt.schema_)
            elif fmt is not None and fmt.type == "json_object":
                constraint = Constraint("json_object")
            config = s.engine.config
            plan = plan_chat(
                s.tokenizer,
                messages,
                tools,
                choice_mode(tools, choice),
                req.parallel_tool_calls,
                constraint,
                None,
                config.tool_call_parser,
                config.reasoning_parser,
            )
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None) or "input") from e
        params.skip_special_tokens = not plan.keep_special
        await s.constrain(params, plan.constraint, "text" if plan.constraint is constraint else "tools")
        prompt = s.encode(plan.prompt_text, "input", special=False)
        rids = s.submit([prompt], params, req)
        head = {
            "id": new_id("resp"),
            "object": "response",
            "created_at": now(),
            "model": s.model_name,
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "output": [],
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": req.store,
            "temperature": req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": req.model_dump(include={"tool_choice"})["tool_choice"] or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p,
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "usage": None,
        }

        def finish(choice: Choice, items: list[dict]) -> dict:
            u = choice.last
            usage = {
                "input_tokens": len(prompt),
                "input_tokens_details": {"cached_tokens": u.num_cached_prompt if u else 0},
                "output_tokens": len(choice.token_ids),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": len(prompt) + len(choice.token_ids),
            }
            done = choice.finish_reason != "length"
            response = head | {
                "status": "completed" if done else "incomplete",
                "incomplete_details": None if done else {"reason": "max_output_tokens"},
                "output": items,
                "usage": usage,
            }
            if req.store:
                self.stored[head["id"]] = (messages + [as_message(items)], response)
                while len(self.stored) > MAX_STORED:
                    self.stored.popitem(last=False)
            return response

        if req.stream:
            return StreamingResponse(self.events(rids, plan, head, finish), media_type="text/event-stream")
        choice = (await s.collect(request, rids, 1))[0]
        return finish(choice, output_items(plan, choice.text))

    async def events(self, rids: list[str], plan: ChatPlan, head: dict, finish) -> AsyncIterator[str]:
        """OpenAI's event sequence; each event carries its `sequence_number`."""
        state = EventState(plan)
        yield state.event("response.created", response=head)
        yield state.event("response.in_progress", response=head)
        choice = Choice(0)
        async for _, batch in self.s.updates(rids, 1):
            for u in batch:
                choice.add(u)
                if u.error:
                    error = {
                        "code": "server_error",
                        "message": f"the request failed inside the engine: {u.error}",
                    }
                    yield state.event("error", **error)
                    return
                for e in state.feed(u.text, final=u.finish_reason is not None):
                    yield e
        for e in state.close():
            yield e
        if not any(item["type"] != "reasoning" for item in state.items):  # as a whole response has one
            for e in state._into("message") + state.close():
                yield e
        response = finish(choice, state.items)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        yield state.event(kind, response=response)


class EventState:
    """Which output item is open while the output streams, and the events that open, fill and close them."""

    def __init__(self, plan: ChatPlan) -> None:
        self.stream = ChatStream(plan)
        self.items: list[dict] = []
        self.open: dict | None = None
        self.number = 0

    def event(self, kind: str, **fields) -> str:
        self.number += 1
        return sse({"type": kind, "sequence_number": self.number} | fields)

    def feed(self, text: str, final: bool) -> list[str]:
        delta = self.stream.feed(text, final)
        out = []
        if delta.get("reasoning_content"):
            out += self._into("reasoning")
            self.open["content"][0]["text"] += delta["reasoning_content"]
            out.append(self._delta("response.reasoning_text.delta", delta["reasoning_content"]))
        if delta.get("content"):
            out += self._into("message")
            self.open["content"][0]["text"] += delta["content"]
            out.append(self._delta("response.output_text.delta", delta["content"], logprobs=[]))
        for d in delta.get("tool_calls", []):
            if "id" in d:
                out += self.close()
                item = call_item(new_id("fc"), d["id"], d["function"]["name"], "", "in_progress")
                out += self._add(item)
            fragment = d["function"].get("arguments", "")
            if fragment:
                self.open["arguments"] += fragment
                out.append(self._delta("response.function_call_arguments.delta", fragment, content=False))
        return out

    def _into(self, kind: str) -> list[str]:
        if self.open is not None and self.open["type"] == kind:
            return []
        out = self.close()
        make = reasoning_item if kind == "reasoning" else message_item
        item = make(new_id("rs" if kind == "reasoning" else "msg"), "", "in_progress")
        out += self._add(item)
        if kind == "message":
            part = item["content"][0]
            out.append(self._part("response.content_part.added", part))
        return out

    def _add(self, item: dict) -> list[str]:
        self.items.append(item)
        self.open = item
        return [self.event("response.output_item.added", output_index=len(self.items) - 1, item=dict(item))]

    def _where(self, content: bool = True) -> dict:
        where = {"item_id": self.open["id"], "output_index": len(self.items) - 1}
        return where | ({"content_index": 0} if content else {})

    def _delta(self, kind: str, text: str, content: bool = True, **extra) -> str:
        return self.event(kind, **self._where(content), delta=text, **extra)

    def _part(self, kind: str, part: dict) -> str:
        return self.event(kind, **self._where(), part=dict(part))

    def close(self) -> list[str]:
        """Done events for the open item (if any)."""
        item, out = self.open, []
        if item is None:
            return out
        if item["type"] == "message":
            text = item["content"][0]["text"]
            out.append(self.event("response.output_text.done", **self._where(), text=text, logprobs=[]))
            out.append(self._part("response.content_part.done", item["content"][0]))
        elif item["type"] == "reasoning":
            text = item["content"][0]["text"]
            out.append(self.event("response.reasoning_text.done", **self._where(), text=text))
        else:
            done = {"arguments": item["arguments"], "name": item["name"]}
            out.append(self.event("response.function_call_arguments.done", **self._where(False), **done))
        item["status"] = "completed"
        out.append(self.event("response.output_item.done", output_index=len(self.items) - 1, item=dict(item)))
        self.open = None
        return out
