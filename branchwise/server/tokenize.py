"""POST /tokenize and /detokenize in vLLM's shapes: a prompt or chat messages to token ids, and back."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from branchwise.server.chat import plan_chat
from branchwise.server.protocol import ChatMessage, Strict, Tool
from branchwise.server.serving import APIError, Serving


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def tokenize(s: Serving, req: TokenizeRequest) -> dict:
    s.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of `prompt` and `messages`", param="prompt")
    if req.messages is not None:
        try:
            plan = plan_chat(
                s.tokenizer,
                [m.model_dump(exclude_none=True) for m in req.messages],
                [t.model_dump(exclude_none=True) for t in req.tools or []],
                template_kwargs=req.chat_template_kwargs,
                add_generation_prompt=req.add_generation_prompt,
            )
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        tokens = s.encode(plan.prompt_text, "messages", special=bool(req.add_special_tokens))
    else:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        tokens = s.encode(req.prompt, "prompt", special=special)
    out = {"count": len(tokens), "max_model_len": s.engine.max_model_len, "tokens": tokens}
    if req.return_token_strs:
        out["token_strs"] = s.tokenizer.convert_ids_to_tokens(tokens)
    return out


def detokenize(s: Serving, req: DetokenizeRequest) -> dict:
    s.check_model(req.model)
    vocab = s.engine.vocab_size
    if req.tokens and (min(req.tokens) < 0 or max(req.tokens) >= vocab):
        raise APIError(400, f"tokens: token ids must be in [0, {vocab})", param="tokens")
    return {"prompt": s.tokenizer.decode(req.tokens)}
