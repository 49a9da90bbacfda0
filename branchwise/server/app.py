"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from branchwise.config import EngineConfig, ServerConfig
from branchwise.engine.engine import LLMEngine
from branchwise.engine.sequence import SamplingParams, SeqUpdate
from branchwise.server.engine_loop import EngineLoop
from branchwise.server.guard import Guard
from branchwise.server.protocol import ChatCompletionRequest, CompletionRequest, error_body, new_id, now

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = (
            status,
            message,
            type_,
            param,
            headers,
        )


@dataclass
class Choice:
    """One completion as it accumulates: text, tokens, logprobs, how it ended, speculation counters."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    last: SeqUpdate | None = None

    def add(self, u: SeqUpdate) -> None:
        self.text += u.text
        self.token_ids += u.token_ids
        self.logprobs += u.logprobs
        self.finish_reason = u.finish_reason or self.finish_reason
        self.error = u.error or self.error
        self.last = u


def usage_of(choices: list[Choice], prompt_lens: list[int], n: int) -> dict:
    """OpenAI's usage plus our extensions: cached prompt tokens and per-request speculation counters."""
    cached = sum(c.last.num_cached_prompt for c in choices[::n] if c.last)
    usage = {
        "prompt_tokens": sum(prompt_lens),
        "completion_tokens": sum(len(c.token_ids) for c in choices),
        "total_tokens": sum(prompt_lens) + sum(len(c.token_ids) for c in choices),
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    steps = sum(c.last.num_draft_steps for c in choices if c.last)
    if steps:
        drafted = sum(c.last.num_drafted for c in choices if c.last)
        accepted = sum(c.last.num_accepted for c in choices if c.last)
        usage["spec_decode"] = {
            "num_drafts": steps,
            "num_draft_tokens": drafted,
            "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_length": 1 + accepted / steps,
        }
    forced = sum(c.last.num_forced for c in choices if c.last)
    if forced:
        usage["structured_output_forced_tokens"] = forced
    return usage


async def merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, list[SeqUpdate]]]:
    """Interleave several requests' update streams, tagging each batch with its stream's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for batch in stream:
                queue.put_nowait((i, batch))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(tasks):
            i, batch = await queue.get()
            if batch is None:
                done += 1
            else:
                yield i, batch
        for t in tasks:
            t.result()  # re-raise a pump's failure
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def create_app(config: ServerConfig, engine: LLMEngine | None = None) -> FastAPI:
    engine = engine or LLMEngine(EngineConfig(**config.model_dump(include=set(EngineConfig.model_fields))))
    loop = EngineLoop(engine)
    tokenizer = engine.tokenizer
    model_name = engine.model_name

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="branchwise", lifespan=lifespan)
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_request_bytes)
    app.state.loop = loop
    app.state.engine = engine
    # no token is shorter than one character and none longer than this: a bound on a text's token count
    max_token_chars = max(len(t) for t in tokenizer.get_vocab())

    # -- errors: always OpenAI's shape ------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.status, e.type, e.param), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return JSONResponse(
                error_body(f"Malformed JSON body: {err.get('msg')}", 400, "invalid_request_error"), 400
            )
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = str(err.get("msg"))
        if err.get("type") == "extra_forbidden":
            msg = "this parameter is not supported by this server"
        message = f"{'.'.join(loc)}: {msg}" if loc else msg
        return JSONResponse(error_body(message, 400, "invalid_request_error", loc[0] if loc else None), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = {404: "not_found_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), e.status_code, kind), e.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", 500, "internal_error"), 500)

    # -- open routes ------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not loop.alive:
            raise APIError(503, "the engine loop has stopped", "service_unavailable")
        return {}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": now(),
            "owned_by": "branchwise",
            "root": engine.model_path,
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    # -- helpers shared by both routes ------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name not in (model_name, config.model):
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "model")

    def encode(text: str, param: str, special: bool = True) -> list[int]:
        """Token ids of a text; a 400 for text that cannot fit (checked before tokenizing) or be encoded."""
        if len(text) > engine.max_model_len * max_token_chars:
            raise APIError(
                400,
                f"This model's maximum context length is {engine.max_model_len} tokens; a text of "
                f"{len(text)} characters is longer than that.",
                param=param,
            )
        try:
            return tokenizer.encode(text, add_special_tokens=special)
        except (TypeError, ValueError) as e:  # e.g. a lone surrogate ("\ud800"): not Unicode text
            raise APIError(400, f"the text cannot be tokenized: {e}", param=param) from e

    def submit(prompts: list[list[int]], params: SamplingParams, req) -> list[str]:
        num_seqs = len(prompts) * params.n
        if num_seqs > engine.config.max_num_seqs:
            raise APIError(
                400,
                f"this request asks for {num_seqs} completions (prompts x n); this server runs at most "
                f"{engine.config.max_num_seqs} at once (max_num_seqs)",
                param="n" if len(prompts) == 1 else "prompt",
            )
        if loop.num_waiting + num_seqs > config.max_queue:
            raise APIError(
                503,
                "The server is overloaded: too many requests are waiting. Retry later.",
                "service_unavailable",
                headers={"Retry-After": "1"},
            )
        name, sparams = req.strategy_choice()
        try:
            engine.strategy(name or engine.config.strategy).parse_params(sparams)
        except ValueError as e:
            raise APIError(400, str(e), param="strategy") from e
        ids = []
        try:
            for prompt in prompts:
                ids.append(new_id("req"))
                loop.submit(ids[-1], prompt, params, name, sparams)
        except ValueError as e:
            for rid in ids[:-1]:
                loop.cancel(rid)
            raise APIError(400, str(e), param=getattr(e, "param", None)) from e
        return ids

    async def sampling(req, max_tokens: int | None, logprobs: int | None) -> tuple[SamplingParams, dict]:
        """The request's sampling params, and what the response reports about its constraint."""
        try:
            params = req.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None)) from e
        param = None
        try:
            params.constraint, param = req.constraint()
            if params.constraint is None:
                return params, {}
            # compiling may take a while (within --max-constraint-seconds): off the event loop
            warnings = await asyncio.to_thread(engine.check_constraint, params.constraint)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e
        if params.constraint.lenient:  # an explicit opt-in: say what was not enforced
            return params, {"structured_output": {"lenient": True, "not_enforced": warnings}}
        return params, {}

    @lru_cache(maxsize=1 << 16)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    def completion_logprobs(entries: list[dict], offset: int) -> dict:
        tokens = [token_text(e["token_id"]) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e["top"]} for e in entries],
            "text_offset": offsets,
        }

    def chat_logprobs(entries: list[dict]) -> dict:
        def item(t: int, lp: float) -> dict:
            text = token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {
            "content": [
                item(e["token_id"], e["logprob"]) | {"top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                for e in entries
            ]
        }

    async def collect(request: Request, rids: list[str], n: int) -> list[Choice]:
        """Run the requests to the end; abort them if the client goes away first."""
        choices = [Choice(i) for i in range(len(rids) * n)]

        async def run() -> None:
            async for i, batch in merged([loop.updates(r, n, config.request_timeout) for r in rids]):
                for u in batch:
                    choices[i * n + u.index].add(u)

        task = asyncio.create_task(run())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "client disconnected")
        task.result()
        failed = [c.error for c in choices if c.error]
        if failed:
            raise APIError(500, f"the request failed inside the engine: {failed[0]}", "internal_error")
        return choices

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    async def stream(
        rids: list[str], n: int, prompt_lens: list[int], req, head: dict, make_chunk, opening=None
    ):
        """SSE events: one chunk per sequence update, the usage chunk if asked, then [DONE]."""
        choices = [Choice(i) for i in range(len(rids) * n)]
        opts = req.stream_options
        if opening:
            for c in choices:
                yield sse(opening(c.index))
        async for i, batch in merged([loop.updates(r, n, config.request_timeout) for r in rids]):
            for u in batch:
                c = choices[i * n + u.index]
                offset = len(c.text)
                c.add(u)
                if u.error:
                    yield sse(
                        error_body(f"the request failed inside the engine: {u.error}", 500, "internal_error")
                    )
                    continue
                if u.text or u.finish_reason or u.logprobs:
                    chunk = make_chunk(c, u, offset)
                    if opts and opts.continuous_usage_stats:
                        chunk["usage"] = usage_of(choices, prompt_lens, n)
                    yield sse(chunk)
        if opts and opts.include_usage:
            yield sse(head | {"choices": [], "usage": usage_of(choices, prompt_lens, n)})
        yield sse("[DONE]")

    # -- /v1/completions ---------------------------------------------------------------------------
    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        for name, bad in (("echo", req.echo), ("suffix", req.suffix)):
            if bad:
                raise APIError(400, f"`{name}` is not supported", param=name)
        if req.best_of not in (None, req.n):
            raise APIError(400, "`best_of` other than n is not supported", param="best_of")
        p = req.prompt
        if isinstance(p, str):
            prompts = [encode(p, "prompt")]
        elif isinstance(p[0], str):
            prompts = [encode(x, "prompt") for x in p]
        elif isinstance(p[0], int):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        params, report = await sampling(req, req.max_tokens, req.logprobs)
        rids = submit(prompts, params, req)
        head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model_name}
        head |= report
        prompt_lens = [len(x) for x in prompts]

        def chunk(c: Choice, u: SeqUpdate, offset: int) -> dict:
            lp = completion_logprobs(u.logprobs, offset) if params.logprobs is not None else None
            return head | {
                "choices": [
                    {"index": c.index, "text": u.text, "finish_reason": u.finish_reason, "logprobs": lp}
                ]
            }

        if req.stream:
            return StreamingResponse(
                stream(rids, req.n, prompt_lens, req, head, chunk), media_type="text/event-stream"
            )
        choices = await collect(request, rids, req.n)
        return head | {
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "logprobs": completion_logprobs(c.logprobs, 0) if params.logprobs is not None else None,
                }
                for c in choices
            ],
            "usage": usage_of(choices, prompt_lens, req.n),
        }

    # -- /v1/chat/completions ---------------------------------------------------------------------
    @v1.post("/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        if not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
            | ({"name": m.name} if m.name else {})
            for m in req.messages
        ]
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tokenize=False
            )
        except Exception as e:  # the template's own checks (roles must alternate, ...) speak to the client
            message = f"the chat template cannot render these messages: {e}"
            raise APIError(400, message, param="messages") from e
        prompt = encode(text, "messages", special=False)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params, report = await sampling(req, req.max_completion_tokens or req.max_tokens, logprobs)
        rids = submit([prompt], params, req)
        head = {
            "id": new_id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": now(),
            "model": model_name,
        } | report

        def opening(index: int) -> dict:
            return head | {
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            }

        def chunk(c: Choice, u: SeqUpdate, offset: int) -> dict:
            delta = {"content": u.text} if u.text else {}
            lp = chat_logprobs(u.logprobs) if logprobs is not None else None
            return head | {
                "choices": [
                    {"index": c.index, "delta": delta, "finish_reason": u.finish_reason, "logprobs": lp}
                ]
            }

        if req.stream:
            return StreamingResponse(
                stream(rids, req.n, [len(prompt)], req, head, chunk, opening), media_type="text/event-stream"
            )
        choices = await collect(request, rids, req.n)
        return head | {
            "object": "chat.completion",
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "finish_reason": c.finish_reason,
                    "logprobs": chat_logprobs(c.logprobs) if logprobs is not None else None,
                }
                for c in choices
            ],
            "usage": usage_of(choices, [len(prompt)], req.n),
        }

    app.include_router(v1)
    return app
