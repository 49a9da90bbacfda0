"""`branchwise bench serve`: load any OpenAI-compatible server and report throughput and latency.

Streams completions at fixed concurrency (or Poisson arrivals at --request-rate) and measures, per request,
time to first token (TTFT), inter-token latency between streamed chunks (ITL), time per output token after
the first (TPOT) and end-to-end latency. Token counts come from the server's `usage` (include_usage), so
under speculation, where several tokens arrive in one chunk, TPOT and ITL differ: both are reported.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from branchwise.bench import percentiles


@dataclass
class RequestResult:
    ok: bool
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestResult:
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if not result.text:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    result.text += chunk["choices"][0]["text"]
        result.latency = time.perf_counter() - start
        result.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_level(
    base_url: str,
    model: str,
    prompts: list[str],
    max_tokens: int,
    concurrency: int,
    request_rate: float,
    api_key: str | None,
    seed: int,
    progress: bool,
) -> dict:
    """One load level: each prompt once, at most `concurrency` in flight, Poisson arrivals at request_rate."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    bar = tqdm(total=len(prompts), desc=f"concurrency {concurrency}", disable=not progress, leave=False)

    async def guarded(client, prompt):
        async with limit:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
            r = await one_request(client, url, body, headers)
            bar.update(1)
            return r

    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(guarded(client, prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "request_rate": request_rate,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": tokens / duration,
        "output_tokens": tokens,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles([x for r in ok for x in r.itls]),
        "e2e_s": percentiles([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def model_of(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def bench_serve(
    base_url: str,
    prompts: list[str],
    concurrency: list[int],
    max_tokens: int = 128,
    request_rate: float = float("inf"),
    model: str | None = None,
    api_key: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    model = model or model_of(base_url, api_key)
    levels = [
        asyncio.run(run_level(base_url, model, prompts, max_tokens, c, request_rate, api_key, seed, progress))
        for c in concurrency
    ]
    return {"base_url": base_url, "model": model, "max_tokens": max_tokens, "levels": levels}


def format_table(result: dict) -> str:
    rows = [
        f"{'conc':>5} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'e2e p50':>8} {'failed':>6}"
    ]
    for lv in result["levels"]:
        ms = lambda d, k: f"{1000 * d[k]:.1f}ms"
        rows.append(
            f"{lv['concurrency']:>5} {lv['request_throughput']:>8.2f} {lv['output_throughput']:>10.1f} "
            f"{ms(lv['ttft_s'], 'p50'):>9} {ms(lv['ttft_s'], 'p99'):>9} {ms(lv['tpot_s'], 'p50'):>9} "
            f"{ms(lv['itl_s'], 'p50'):>8} {ms(lv['itl_s'], 'p99'):>8} {ms(lv['e2e_s'], 'p50'):>8} "
            f"{lv['failed']:>6}"
        )
    return "\n".join(rows)
