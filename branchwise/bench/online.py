"""`branchwise bench serve`: load any OpenAI-compatible server and report throughput and latency.

Streams completions at fixed concurrency (or Poisson arrivals at --request-rate) and measures, per request,
time to first token (TTFT), inter-token latency between streamed chunks (ITL), time per output token after
the first (TPOT) and end-to-end latency. Token counts come from the server's `usage` (include_usage), so
under speculation, where several tokens arrive in one chunk, TPOT and ITL differ: both are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
    chunks: int = 0  # streamed chunks with text: the token count where a server sends no usage


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
                    result.chunks += 1
                    now = time.perf_counter()
                    if not result.text:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    result.text += chunk["choices"][0]["text"]
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or result.chunks
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
    ignore_eos: bool = True,
) -> dict:
    """One load level: each prompt once, at most `concurrency` in flight, Poisson arrivals at request_rate.
    `ignore_eos`: every request writes max_tokens (a server that refuses the field gets requests that stop at
    EOS; where a server sends no usage, its streamed chunks are counted as tokens)."""
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
                "stream_options": {"include_usage": True},
            }
            if ignore_eos:
                body["ignore_eos"] = True
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


def accepts_ignore_eos(base_url: str, model: str, api_key: str | None) -> bool:
    """Whether a server takes `ignore_eos` (ours, vLLM's and SGLang's do; `transformers serve` refuses it)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": "Hi", "max_tokens": 1, "ignore_eos": True}
    r = httpx.post(base_url.rstrip("/") + "/v1/completions", json=body, headers=headers, timeout=120)
    return r.status_code == 200


def bench_compare(
    base_urls: list[str],
    prompts: list[str],
    concurrency: list[int],
    max_tokens: int = 128,
    rounds: int = 3,
    request_rate: float = float("inf"),
    model: str | None = None,
    api_key: str | None = None,
    seed: int = 0,
) -> dict:
    """The same load on several servers in alternated rounds (A, B, A, B, ... per level): each server's
    median output throughput per level over the rounds, and its ratio to the first server's. The same
    requests go to every server: `ignore_eos` only if every server takes it (else greedy requests stop at
    EOS everywhere, and the same weights write the same tokens: compare `mean_output_tokens`)."""
    servers = [{"base_url": url, "model": model or model_of(url, api_key)} for url in base_urls]
    ignore_eos = all(accepts_ignore_eos(s["base_url"], s["model"], api_key) for s in servers)
    runs = {(i, c): [] for i in range(len(servers)) for c in concurrency}
    for r in range(rounds):
        for c in concurrency:
            order = list(range(len(servers)))
            order = order if r % 2 == 0 else order[::-1]  # neither server always goes first
            for i in order:
                s = servers[i]
                level = run_level(
                    s["base_url"],
                    s["model"],
                    prompts,
                    max_tokens,
                    c,
                    request_rate,
                    api_key,
                    seed,
                    False,
                    ignore_eos,
                )
                runs[(i, c)].append(asyncio.run(level))
    for i, s in enumerate(servers):
        s["levels"] = []
        for c in concurrency:
            levels = runs[(i, c)]
            tput = [lv["output_throughput"] for lv in levels]
            s["levels"].append(
                {
                    "concurrency": c,
                    "output_throughput": statistics.median(tput),
                    "rounds": tput,
                    "mean_output_tokens": statistics.mean(
                        lv["output_tokens"] / max(lv["completed"], 1) for lv in levels
                    ),
                    "failed": sum(lv["failed"] for lv in levels),
                    "tpot_p50_s": statistics.median(lv["tpot_s"]["p50"] for lv in levels),
                }
            )
    for s in servers:
        for lv, first in zip(s["levels"], servers[0]["levels"], strict=True):
            lv["ratio_to_first"] = lv["output_throughput"] / first["output_throughput"]
    return {"max_tokens": max_tokens, "rounds": rounds, "ignore_eos": ignore_eos, "servers": servers}


def format_compare(result: dict) -> str:
    rows = [f"{'server':<32} {'conc':>5} {'out tok/s':>10} {'ratio':>6} {'tokens/req':>10} {'failed':>6}"]
    for s in result["servers"]:
        for lv in s["levels"]:
            rows.append(
                f"{s['base_url']:<32} {lv['concurrency']:>5} {lv['output_throughput']:>10.1f} "
                f"{lv['ratio_to_first']:>6.2f} {lv['mean_output_tokens']:>10.1f} {lv['failed']:>6}"
            )
    return "\n".join(rows)


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


@contextlib.contextmanager
def launched(commands: list[str], log_dir: Path, timeout: float = 600.0) -> Iterator[list[str]]:
    """Start each server command on a free loopback port (its `{port}`), wait until every one answers
    `/v1/models`, and give their base URLs; they are stopped on the way out, their output in
    log_dir/server-<i>.log (e.g. ours and `transformers serve --continuous-batching`, in one command)."""
    procs: list[subprocess.Popen] = []
    urls, logs = [], []
    try:
        for i, command in enumerate(commands):
            if "{port}" not in command:
                raise ValueError(f"--launch {command!r}: the command must take the port as {{port}}")
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            logs.append(log_dir / f"server-{i}.log")
            with open(logs[-1], "wb") as log:
                procs.append(
                    subprocess.Popen(
                        shlex.split(command.replace("{port}", str(port))),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # stopped with whatever it started
                    )
                )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        for url, proc, command, log in zip(urls, procs, commands, logs, strict=True):
            while not _answers(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    state = "exited" if proc.poll() is not None else f"did not answer in {timeout:.0f} s"
                    raise RuntimeError(f"--launch {command!r} {state}; its output: {log}")
                time.sleep(0.5)
        yield urls
    finally:
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal a launched server and what it started (it may have exited by now)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _answers(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
