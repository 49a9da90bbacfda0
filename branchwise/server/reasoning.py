"""Reasoning models' think text: split from the answer (whole or streamed), and the grammar prefix that
lets a constraint apply only after the thinking ends.

Both families write `<think> ... </think>` before the answer. The chat template may open `<think>` in the
prompt itself (DeepSeek-R1's, Qwen3's with thinking on), then the output starts inside the thinking; Qwen3
with `enable_thinking: false` closes it in the prompt, and the output has none. Where the output ends
before `</think>`, DeepSeek-R1's text counts as reasoning; Qwen3's counts as reasoning only if it opened
`<think>`.
"""

from __future__ import annotations

from typing import ClassVar

from branchwise.server.tool_parsers import _held, marker

START, END = "<think>", "</think>"


class ReasoningParser:
    name: ClassVar[str]
    always_thinks: ClassVar[bool]  # unclosed output without `<think>` is reasoning (DeepSeek-R1)

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def state_after(self, prompt_text: str) -> str:
        """Where the prompt leaves the output: 'inside' a think block it opened, 'after' one it closed at
        its very end (thinking turned off), or 'before' any."""
        if prompt_text.rfind(START) > prompt_text.rfind(END):
            return "inside"
        return "after" if prompt_text.rstrip().endswith(END) else "before"

    def split(self, text: str, state: str, final: bool) -> tuple[str | None, str]:
        """(reasoning, content) of the output so far, from the `state_after` its prompt."""
        if state == "after":
            return None, text
        inside = state == "inside"
        body = text if inside else text.lstrip()
        if not inside and not final and body and START.startswith(body) and body != START:
            return "", ""  # `<think>` may be arriving
        if not inside and body.startswith(START):
            body = body[len(START) :]
        elif not inside and not self.always_thinks:
            return "", text
        end = body.find(END)
        if end < 0:  # still thinking
            return (body if final else body[: len(body) - _held(body, END)]), ""
        return body[:end], body[end + len(END) :].lstrip("\n")

    def grammar(self, state: str) -> str:
        """Lark rules defining `reasoning`: the think block up to and including its end, and the newlines
        after it; the caller writes `start: reasoning body`."""
        if state == "after":
            return 'reasoning: ""\n'
        inside = state == "inside"
        start, end = marker(self.tokenizer, START), marker(self.tokenizer, END)
        if end.startswith("<["):  # a token: any other token may come before it
            think = f"think: <[^{end[2:-2]}]>* {end}\n"
        else:
            think = f"think[lazy]: /(?s:.*){_regex_literal(END)}/\n"
        opening = "" if inside else (f"{start}? " if self.always_thinks else None)
        if opening is None:  # Qwen3: thinking is optional when the prompt did not open it
            return f"reasoning: ({start} think NL)?\n{think}NL: /\\n{{0,2}}/\n"
        return f"reasoning: {opening}think NL\n{think}NL: /\\n{{0,2}}/\n"


def _regex_literal(text: str) -> str:
    return "".join("\\" + c if not c.isalnum() else c for c in text)


class DeepSeekR1Parser(ReasoningParser):
    name = "deepseek_r1"
    always_thinks = True


class Qwen3Parser(ReasoningParser):
    name = "qwen3"
    always_thinks = False


PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (DeepSeekR1Parser, Qwen3Parser)}


def reasoning_parser_for(name: str | None, tokenizer) -> ReasoningParser | None:
    if name is None:
        return None
    if name not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose from {sorted(PARSERS)}")
    return PARSERS[name](tokenizer)


class ReasoningStream:
    """Deltas of (reasoning, content) from a growing output."""

    def __init__(self, parser: ReasoningParser, state: str) -> None:
        self.parser, self.state = parser, state
        self.text, self.sent = "", (0, 0)

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        reasoning, content = self.parser.split(self.text, self.state, final)
        reasoning = reasoning or ""
        r, c = self.sent
        self.sent = (max(r, len(reasoning)), max(c, len(content)))
        return reasoning[r:], content[c:]
