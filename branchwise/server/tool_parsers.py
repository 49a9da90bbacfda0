"""Tool-call formats per model family: how a call is written, constrained (a Lark grammar for llguidance)
and read back, whole or while it streams.

Every parser's `split(text, final)` reads the output so far into (content, calls); while streaming
(`final=False`) it holds back what could still become a marker, and a call's `arguments` is the part of
the arguments object the model has written. `arguments` is always the JSON text as the model wrote it,
so streamed fragments concatenate to exactly the final string.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import ClassVar

from branchwise.engine.sequence import InvalidRequest

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}


@dataclass
class Call:
    name: str | None  # None until the model has written it
    arguments: str  # the arguments object's JSON text so far
    done: bool = False


def call_schema(tools: list[dict], args_key: str) -> dict:
    """JSON schema of one call object `{"name": ..., args_key: {...}}` to any of the tools."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["name"]},
                args_key: t.get("parameters") or {"type": "object"},
            },
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return {"x-guidance": JSON_LAYOUT, **(options[0] if len(options) == 1 else {"anyOf": options})}


def marker(tokenizer, text: str) -> str:
    """`text` in Lark: its token (`<[id]>`) where it is one added token (llguidance treats those as special,
    never as bytes), else a string literal."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and text in tokenizer.get_added_vocab():
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def _held(text: str, marker_text: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker_text`."""
    for n in range(min(len(text), len(marker_text) - 1), 0, -1):
        if marker_text.startswith(text[-n:]):
            return n
    return 0


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array that starts at `start`, None if it has not ended yet."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def read_call(text: str, args_key: str) -> tuple[Call, int]:
    """The call object at the start of `text`: (call, index past its closing brace, or -1 if unfinished)."""
    m = _HEAD.match(text)
    if m is None or text[m.end() : m.end() + 1] not in ("{", "["):
        start = len(text) - len(text.lstrip())
        try:  # another key order, or spacing: a whole object still reads
            obj, end = json.JSONDecoder().raw_decode(text, start)
        except json.JSONDecodeError:
            return Call(None, ""), -1
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return Call(None, ""), -1
        args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
        return Call(obj["name"], json.dumps(args, ensure_ascii=False), True), end
    name = json.loads(f'"{m.group(1)}"')
    end = _value_end(text, m.end())
    if end is None:
        return Call(name, text[m.end() :]), -1
    close = re.match(r"\s*\}", text[end:])
    if close is None:
        return Call(name, text[m.end() : end]), -1
    return Call(name, text[m.end() : end], True), end + close.end()


class ToolParser:
    """One family's call syntax. Subclasses set the markers and `calls_rule`."""

    name: ClassVar[str]
    args_key: ClassVar[str] = "arguments"
    opener: ClassVar[str | None] = None  # text that starts the calls (None: they start the output)

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """(content, finished calls) of a whole output."""
        content, calls = self.split(text, final=True)
        return content, [c for c in calls if c.done]

    def grammar(self, schema: dict, mode: str, parallel: bool) -> str:
        """Lark rules defining `body` for tool_choice `mode` (auto | required | named, one function)."""
        raise NotImplementedError

    def _marker(self, text: str) -> str:
        return marker(self.tokenizer, text)

    def _opener_rule(self) -> str:
        """`hd`: free text up to and including the opener (lazy where the opener is text, not a token)."""
        mark = self._marker(self.opener)
        lazy = "[lazy]" if mark.startswith('"') else ""
        return f"hd{lazy}: TEXT {mark}\nTEXT: /(?s:.*)/\n"


class HermesParser(ToolParser):
    """Hermes, Qwen2.5, Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated."""

    name = "hermes"
    opener, closer = "<tool_call>", "</tool_call>"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        at = text.find(self.opener)
        if at < 0:
            return (text if final else text[: len(text) - _held(text, self.opener)]), []
        content, calls, pos = text[:at], [], at
        while text.startswith(self.opener, pos):
            body = pos + len(self.opener)
            end = text.find(self.closer, body)
            call, _ = read_call(text[body : len(text) if end < 0 else end], self.args_key)
            calls.append(call)
            if end < 0 or not call.done:
                return content, calls
            pos = end + len(self.closer)
            pos += len(text[pos:]) - len(text[pos:].lstrip())
        rest = text[pos:]
        if not final:
            rest = rest[: len(rest) - _held(rest, self.opener)]
        return content + rest, calls

    def grammar(self, schema: dict, mode: str, parallel: bool) -> str:
        opener, closer = self._marker(self.opener), self._marker(self.closer)
        more = ' ("\\n" call)*' if parallel else ""
        rules = f'tail: "\\n" fn "\\n" {closer}\ncall: {opener} tail\nfn: %json {json.dumps(schema)}\n'
        if mode == "auto":
            return f"body: TEXT | hd tail{more}\n" + rules + self._opener_rule()
        return f"body: call{more}\n" + rules


class Llama3JsonParser(ToolParser):
    """Llama 3.1-3.3 JSON tool calling: the output is `{"name": ..., "parameters": {...}}`, `; `-separated."""

    name = "llama3_json"
    args_key = "parameters"
    python_tag = "<|python_tag|>"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        body = text.lstrip()
        if body.startswith(self.python_tag):
            body = body[len(self.python_tag) :].lstrip()
        if not body or (not final and self.python_tag.startswith(body)):
            return (text if final else ""), []  # what the output is has not shown yet
        if not body.startswith("{"):
            return text, []
        calls, pos = [], 0
        while True:
            call, end = read_call(body[pos:], self.args_key)
            calls.append(call)
            if end < 0:
                return "", calls
            pos += end
            sep = re.match(r"\s*;\s*", body[pos:])
            if sep is None:
                return "", calls
            pos += sep.end()

    def grammar(self, schema: dict, mode: str, parallel: bool) -> str:
        more = ' ("; " fn)*' if parallel else ""
        rules = f"fn: %json {json.dumps(schema)}\n"
        if mode == "auto":  # text that does not open with `{` is an answer
            return f"body: TEXT | fn{more}\n" + rules + "TEXT: /([^{](?s:.*))?/\n"
        return f"body: fn{more}\n" + rules


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after any text."""

    name = "mistral"
    opener = "[TOOL_CALLS]"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        at = text.find(self.opener)
        if at < 0:
            return (text if final else text[: len(text) - _held(text, self.opener)]), []
        return text[:at], _array(text[at + len(self.opener) :], self.args_key)

    def grammar(self, schema: dict, mode: str, parallel: bool) -> str:
        more = ' (", " fn)*' if parallel else ""
        rules = f'calls: "[" fn{more} "]"\nfn: %json {json.dumps(schema)}\n'
        if mode == "auto":
            return "body: TEXT | hd calls\n" + rules + self._opener_rule()
        return f"body: {self._marker(self.opener)} calls\n" + rules


class JsonArrayParser(ToolParser):
    """vLLM's form for `required` and named choices when the model has no known format: a JSON array of
    `{"name": ..., "parameters": {...}}`."""

    name = "json"
    args_key = "parameters"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        return "", _array(text, self.args_key)

    def grammar(self, schema: dict, mode: str, parallel: bool) -> str:
        if mode == "auto":
            message = "tool_choice 'auto' needs a tool-call format for this model (--tool-call-parser)"
            raise InvalidRequest(message, "tool_choice")
        more = ' ("," fn)*' if parallel else ""
        return f'body: "[" fn{more} "]"\nfn: %json {json.dumps(schema)}\n'


def _array(text: str, args_key: str) -> list[Call]:
    """Calls in a JSON array `[call, call, ...]` (possibly unfinished)."""
    m = re.match(r"\s*\[", text)
    if m is None:
        return []
    calls, pos = [], m.end()
    while True:
        call, end = read_call(text[pos:], args_key)
        if call.name is None and not call.done and not calls and not text[pos:].strip():
            return calls
        calls.append(call)
        if end < 0:
            return calls
        pos += end
        sep = re.match(r"\s*,\s*", text[pos:])
        if sep is None:
            return calls
        pos += sep.end()


def choice_mode(tools: list[dict] | None, tool_choice) -> tuple[str | None, str | None]:
    """OpenAI's tool_choice as (None: no calls | 'auto' | 'required' | 'named', the named function)."""
    if not tools or tool_choice == "none":
        return None, None
    if isinstance(tool_choice, dict):
        return "named", tool_choice["function"]["name"]
    return tool_choice or "auto", None


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, JsonArrayParser)
}


def parser_for(name: str | None, tokenizer) -> ToolParser:
    """The named parser, or with `auto`/None the one the chat template writes (JSON array if none)."""
    if name in (None, "auto"):
        template = tokenizer.chat_template or ""
        if "<tool_call>" in template:
            name = "hermes"
        elif "[TOOL_CALLS]" in template:
            name = "mistral"
        elif '"parameters"' in template:
            name = "llama3_json"
        else:
            name = "json"
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose from {['auto', *PARSERS]}")
    return PARSERS[name](tokenizer)


class CallStream:
    """Turns a growing output into OpenAI's deltas: content, and per call a first delta with index, id,
    type and name, then argument fragments."""

    def __init__(self, parser: ToolParser, new_id) -> None:
        self.parser, self.new_id = parser, new_id
        self.text, self.content_sent = "", 0
        self.ids: list[str] = []
        self.args_sent: list[int] = []

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        self.text += delta
        content, calls = self.parser.split(self.text, final)
        out, self.content_sent = content[self.content_sent :], max(self.content_sent, len(content))
        deltas = []
        for i, call in enumerate(calls):
            if call.name is None:
                break
            if i == len(self.ids):
                self.ids.append(self.new_id())
                self.args_sent.append(0)
                fn = {"name": call.name, "arguments": ""}
                deltas.append({"index": i, "id": self.ids[i], "type": "function", "function": fn})
            fragment = call.arguments[self.args_sent[i] :]
            if fragment:
                self.args_sent[i] = len(call.arguments)
                deltas.append({"index": i, "function": {"arguments": fragment}})
        return out, deltas
