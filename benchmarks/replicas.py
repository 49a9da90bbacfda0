"""Throughput of 1 vs 2 `branchwise serve` replicas behind SGLang's router, alternated rounds, on loopback.

    python benchmarks/replicas.py [--model demo] [--concurrency 8,32] [--num-prompts 64] [--repeats 3]

Starts three replicas (one for the single-replica setup, two for the pair), a router in front of each
setup (`python -m sglang_router.launch_router`, cache-aware policy), and loads each router with
`branchwise bench serve`'s client (streamed completions, fixed concurrency), alternating the setups round
by round; reports the median output tok/s. Each replica gets cores / replicas threads, as a deployment
on one host would set them. Writes replicas.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from branchwise.bench.datasets import load_prompts
from branchwise.bench.online import bench_serve, model_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dataset", default="chat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    procs, routers = [], {}
    try:
        for n in (1, 2):
            workers = []
            for _ in range(n):
                port = free_port()
                env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // n)))
                cmd = ["branchwise", "serve", args.model, "--host", "127.0.0.1", "--port", str(port)]
                procs.append(subprocess.Popen([*cmd, "--log-level", "warning"], env=env))
                workers.append(f"http://127.0.0.1:{port}")
            for url in workers:
                wait_healthy(url)
            port = free_port()
            router = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers]
            router += ["--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware"]
            router += ["--prometheus-port", str(free_port()), "--log-level", "warn"]
            procs.append(subprocess.Popen(router, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            routers[n] = f"http://127.0.0.1:{port}"
            wait_healthy(routers[n], 60)
        prompts = load_prompts(args.dataset, args.num_prompts)
        model = model_of(workers[0], None)  # the router's own /v1/models names no model
        levels = [int(c) for c in args.concurrency.split(",")]
        runs: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for n, url in routers.items():
                result = bench_serve(url, prompts, levels, args.max_tokens, model=model, progress=False)
                for level in result["levels"]:
                    assert level["failed"] == 0, level
                    runs.setdefault(f"{n} replica(s) c{level['concurrency']}", []).append(
                        level["output_throughput"]
                    )
    finally:
        for p in procs:
            p.kill()
            p.wait()
    result = {
        "model": args.model,
        "host": platform.processor() or platform.machine(),
        "cores": cores,
        "max_tokens": args.max_tokens,
        "output_tok_per_s": {k: statistics.median(v) for k, v in runs.items()},
        "runs": runs,
    }
    for key, value in result["output_tok_per_s"].items():
        print(f"{key:20s} {value:8.1f} tok/s")
    out = Path(args.out or "bench-results") / "replicas.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
