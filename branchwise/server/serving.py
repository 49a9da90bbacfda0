"""What every API surface shares: admission (model name, tokenizing, sampling params and constraint,
queue limits), running requests to the end or as SSE, usage, logprobs and the error type."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache

from fastapi import Request

from branchwise.config import ServerConfig
from branchwise.engine.engine import LLMEngine
from branchwise.engine.sequence import SamplingParams, SeqUpdate
from branchwise.server.engine_loop import EngineLoop
from branchwise.server.protocol import error_body, new_id


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
    prompt_logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    last: SeqUpdate | None = None

    def add(self, u: SeqUpdate) -> None:
        self.text += u.text
        self.token_ids += u.token_ids
        self.logprobs += u.logprobs
        self.prompt_logprobs += u.prompt_logprobs
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


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Serving:
    """One engine behind the API: the helpers each route uses to admit, run and answer a request."""

    def __init__(self, config: ServerConfig, engine: LLMEngine) -> None:
        self.config, self.engine = config, engine
        self.loop = EngineLoop(engine)
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        # no token is shorter than one character and none longer than this: a bound on a text's tokens
        self.max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        self.token_text = lru_cache(maxsize=1 << 16)(lambda t: self.tokenizer.decode([t]))

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.model_name, self.config.model):
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "model")

    def encode(self, text: str, param: str, special: bool = True) -> list[int]:
        """Token ids of a text; a 400 for text that cannot fit (checked before tokenizing) or be encoded."""
        self.check_length(text, param)
        try:
            return self.tokenizer.encode(text, add_special_tokens=special)
        except (TypeError, ValueError) as e:  # e.g. a lone surrogate ("\ud800"): not Unicode text
            raise APIError(400, f"the text cannot be tokenized: {e}", param=param) from e

    def check_length(self, text: str, param: str) -> None:
        limit = self.engine.max_model_len
        if len(text) > limit * self.max_token_chars:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens; a text of {len(text)} characters "
                "is longer than that.",
                param=param,
            )

    async def sampling(
        self, req, max_tokens: int | None, logprobs: int | None
    ) -> tuple[SamplingParams, dict]:
        """The request's sampling params with its own constraint compiled (a 400 if it does not)."""
        try:
            params = req.sampling_params(max_tokens, logprobs)
            constraint, param = req.constraint()
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None)) from e
        return params, await self.constrain(params, constraint, param)

    async def constrain(self, params: SamplingParams, constraint, param: str | None) -> dict:
        """Compile `constraint` into params (off the event loop: within --max-constraint-seconds); returns
        what the response reports about it."""
        params.constraint = constraint
        if constraint is None:
            return {}
        try:
            warnings = await asyncio.to_thread(self.engine.check_constraint, constraint)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e
        if constraint.lenient:  # an explicit opt-in: say what was not enforced
            return {"structured_output": {"lenient": True, "not_enforced": warnings}}
        return {}

    def submit(self, prompts: list[list[int]], params: SamplingParams, req) -> list[str]:
        num_seqs = len(prompts) * params.n
        if num_seqs > self.engine.config.max_num_seqs:
            raise APIError(
                400,
                f"this request asks for {num_seqs} completions (prompts x n); this server runs at most "
                f"{self.engine.config.max_num_seqs} at once (max_num_seqs)",
                param="n" if len(prompts) == 1 else "prompt",
            )
        if self.loop.num_waiting + num_seqs > self.config.max_queue:
            raise APIError(
                503,
                "The server is overloaded: too many requests are waiting. Retry later.",
                "service_unavailable",
                headers={"Retry-After": "1"},
            )
        name, sparams = req.strategy_choice()
        try:
            self.engine.strategy(name or self.engine.config.strategy).parse_params(sparams)
        except ValueError as e:
            raise APIError(400, str(e), param="strategy") from e
        ids = []
        try:
            for prompt in prompts:
                ids.append(new_id("req"))
                self.loop.submit(ids[-1], prompt, params, name, sparams)
        except ValueError as e:
            for rid in ids[:-1]:
                self.loop.cancel(rid)
            raise APIError(400, str(e), param=getattr(e, "param", None)) from e
        return ids

    def updates(self, rids: list[str], n: int) -> AsyncIterator[tuple[int, list[SeqUpdate]]]:
        timeout = self.config.request_timeout
        return merged([self.loop.updates(r, n, timeout) for r in rids])

    async def collect(self, request: Request, rids: list[str], n: int) -> list[Choice]:
        """Run the requests to the end; abort them if the client goes away first."""
        choices = [Choice(i) for i in range(len(rids) * n)]

        async def run() -> None:
            async for i, batch in self.updates(rids, n):
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

    async def stream(
        self,
        rids: list[str],
        n: int,
        prompt_lens: list[int],
        req,
        head: dict,
        make_chunk: Callable[[Choice, SeqUpdate, int], dict | None],
        opening: Callable[[int], dict] | None = None,
    ) -> AsyncIterator[str]:
        """SSE events: one chunk per sequence update, the usage chunk if asked, then [DONE]."""
        choices = [Choice(i) for i in range(len(rids) * n)]
        opts = req.stream_options
        if opening:
            for c in choices:
                yield sse(opening(c.index))
        async for i, batch in self.updates(rids, n):
            for u in batch:
                c = choices[i * n + u.index]
                offset = len(c.text)
                c.add(u)
                if u.error:
                    message = f"the request failed inside the engine: {u.error}"
                    yield sse(error_body(message, 500, "internal_error"))
                    continue
                if u.text or u.finish_reason or u.logprobs or u.prompt_logprobs:
                    chunk = make_chunk(c, u, offset)
                    if chunk is None:
                        continue
                    if opts and opts.continuous_usage_stats:
                        chunk["usage"] = usage_of(choices, prompt_lens, n)
                    yield sse(chunk)
        if opts and opts.include_usage:
            yield sse(head | {"choices": [], "usage": usage_of(choices, prompt_lens, n)})
        yield sse("[DONE]")

    def completion_logprobs(self, entries: list[dict], offset: int) -> dict:
        tokens = [self.token_text(e["token_id"]) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{self.token_text(t): lp for t, lp in e["top"]} for e in entries],
            "text_offset": offsets,
        }

    def prompt_logprobs(self, entries: list[dict]) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: None for the first prompt token, then {token id: logprob, rank, text}."""

        def item(t: int, lp: float, rank: int | None) -> dict:
            return {"logprob": lp, "rank": rank, "decoded_token": self.token_text(t)}

        out: list[dict | None] = [None]
        for e in entries:
            scored = {str(t): item(t, lp, None) for t, lp in e["top"]}
            scored[str(e["token_id"])] = item(e["token_id"], e["logprob"], e["rank"])
            out.append(scored)
        return out

    def chat_logprobs(self, entries: list[dict]) -> dict:
        def item(t: int, lp: float) -> dict:
            text = self.token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {
            "content": [
                item(e["token_id"], e["logprob"]) | {"top_logprobs": [item(t, lp) for t, lp in e["top"]]}
                for e in entries
            ]
        }
