"""POST /v1/completions: prompts (text or token ids, one or many) to completions."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import StreamingResponse

from branchwise.engine.sequence import SeqUpdate
from branchwise.server.protocol import CompletionRequest, new_id, now
from branchwise.server.serving import APIError, Choice, Serving, usage_of


async def create_completion(s: Serving, req: CompletionRequest, request: Request):
    s.check_model(req.model)
    for name, bad in (("echo", req.echo), ("suffix", req.suffix)):
        if bad:
            raise APIError(400, f"`{name}` is not supported", param=name)
    if req.best_of not in (None, req.n):
        raise APIError(400, "`best_of` other than n is not supported", param="best_of")
    p = req.prompt
    if isinstance(p, str):
        prompts = [s.encode(p, "prompt")]
    elif isinstance(p[0], str):
        prompts = [s.encode(x, "prompt") for x in p]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    params, report = await s.sampling(req, req.max_tokens, req.logprobs)
    rids = s.submit(prompts, params, req)
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": s.model_name}
    head |= report
    prompt_lens = [len(x) for x in prompts]
    with_logprobs = params.logprobs is not None

    def chunk(c: Choice, u: SeqUpdate, offset: int) -> dict:
        lp = s.completion_logprobs(u.logprobs, offset) if with_logprobs else None
        choice = {"index": c.index, "text": u.text, "finish_reason": u.finish_reason, "logprobs": lp}
        return head | {"choices": [choice]}

    if req.stream:
        events = s.stream(rids, req.n, prompt_lens, req, head, chunk)
        return StreamingResponse(events, media_type="text/event-stream")
    choices = await s.collect(request, rids, req.n)
    return head | {
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": s.completion_logprobs(c.logprobs, 0) if with_logprobs else None,
            }
            for c in choices
        ],
        "usage": usage_of(choices, prompt_lens, req.n),
    }
