"""POST /v1/completions: prompts (text or token ids, one or many) to completions; `echo` puts the prompt
in front of each, and `prompt_logprobs` (or `echo` with `logprobs`) scores the prompt's tokens too."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import StreamingResponse

from branchwise.engine.sequence import SeqUpdate
from branchwise.server.protocol import CompletionRequest, new_id, now
from branchwise.server.serving import APIError, Choice, Serving, usage_of


async def create_completion(s: Serving, req: CompletionRequest, request: Request):
    s.check_model(req.model)
    if req.suffix:
        raise APIError(400, "`suffix` is not supported", param="suffix")
    if req.best_of not in (None, req.n):
        raise APIError(400, "`best_of` other than n is not supported", param="best_of")
    p = req.prompt
    if isinstance(p, str):
        texts, prompts = [p], [s.encode(p, "prompt")]
    elif isinstance(p[0], str):
        texts, prompts = list(p), [s.encode(x, "prompt") for x in p]
    else:
        prompts = [list(p)] if isinstance(p[0], int) else [list(x) for x in p]
        texts = [None] * len(prompts)  # decoded below, once the ids are known to be in the vocabulary
    params, report = await s.sampling(req, req.max_tokens, req.logprobs)
    scored = req.prompt_logprobs
    if req.echo and req.logprobs is not None:  # echoed tokens come with their logprobs
        scored = max(scored or 0, req.logprobs)
    params.prompt_logprobs = scored
    rids = s.submit(prompts, params, req)
    texts = [t if t is not None else s.tokenizer.decode(ids) for t, ids in zip(texts, prompts, strict=True)]
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": s.model_name}
    head |= report
    n, with_logprobs = req.n, params.logprobs is not None
    prompt_lens = [len(x) for x in prompts]
    scores: list[list[dict]] = [[] for _ in prompts]  # each prompt's token scores, from its first choice

    def echo_logprobs(i: int) -> dict:
        """The legacy logprobs of prompt i's tokens: None for the first, then their scores."""
        first = {"token_id": prompts[i][0], "logprob": None, "top": []}
        lp = s.completion_logprobs([first] + scores[i], 0)
        lp["top_logprobs"][0] = None
        return lp

    def logprobs_of(c: Choice, entries: list[dict], offset: int, echoed: bool) -> dict | None:
        if not with_logprobs:
            return None
        lp = s.completion_logprobs(entries, offset + (len(texts[c.index // n]) if echoed else 0))
        if not echoed:
            return lp
        prompt = echo_logprobs(c.index // n)
        return {k: prompt[k] + lp[k] for k in lp}

    def extras(c: Choice, first: bool) -> dict:
        if req.prompt_logprobs is None or not first:
            return {}
        return {"prompt_logprobs": s.prompt_logprobs(scores[c.index // n])}

    echoed: set[int] = set()

    def chunk(c: Choice, u: SeqUpdate, offset: int) -> dict | None:
        i = c.index // n
        if u.prompt_logprobs and c.index % n == 0:
            scores[i] += u.prompt_logprobs
        if not (u.text or u.finish_reason or u.logprobs):
            return None  # prompt scores alone: they come with the choice's first chunk
        first = c.index not in echoed
        echoed.add(c.index)
        echo = req.echo and first
        text = (texts[i] if echo else "") + u.text
        lp = logprobs_of(c, u.logprobs, offset, echo)
        choice = {"index": c.index, "text": text, "finish_reason": u.finish_reason, "logprobs": lp}
        return head | {"choices": [choice | extras(c, first)]}

    if req.stream:
        events = s.stream(rids, n, prompt_lens, req, head, chunk)
        return StreamingResponse(events, media_type="text/event-stream")
    choices = await s.collect(request, rids, n)
    for c in choices:
        if c.index % n == 0:
            scores[c.index // n] = c.prompt_logprobs
    return head | {
        "choices": [
            {
                "index": c.index,
                "text": (texts[c.index // n] if req.echo else "") + c.text,
                "finish_reason": c.finish_reason,
                "logprobs": logprobs_of(c, c.logprobs, 0, req.echo),
            }
            | extras(c, True)
            for c in choices
        ],
        "usage": usage_of(choices, prompt_lens, n),
    }
