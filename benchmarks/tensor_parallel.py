"""Decode throughput at --tensor-parallel-size 1 vs 2 on a mid-size random Llama, side by side in one process.

    python benchmarks/tensor_parallel.py [--batch 1,8] [--tokens 64] [--repeats 3]

Both engines load once (the second with one more rank, a process of its own); rounds alternate between them
and the table gives the median tok/s of --repeats rounds, greedy, `ar`, fixed lengths (ignore_eos). On a CPU
the ranks share the host's cores (each takes cores / size threads): expect no gain there, only what the two
all-reduces a layer cost. Writes tensor_parallel-<device>.json into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from branchwise import LLM, SamplingParams
from branchwise.train.tiny import build_tiny_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = dict(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=8, init_std=0.02)
    path = str(build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "mid", "llama", **shape))
    threads = torch.get_num_threads()
    engines = {1: LLM(path, device=args.device), 2: LLM(path, device=args.device, tensor_parallel_size=2)}
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    runs: dict[str, list[float]] = {}
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = [[(7 * i + j) % 500 + 3 for j in range(32)] for i in range(batch)]
        for llm in engines.values():
            llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0))  # warm-up
        for _ in range(args.repeats):
            for size, llm in engines.items():
                torch.set_num_threads(max(1, threads // size))  # rank 0 shares the cores too
                start = time.perf_counter()
                outs = llm.generate(prompts, params)
                elapsed = time.perf_counter() - start
                n = sum(len(c.token_ids) for o in outs for c in o.outputs)
                runs.setdefault(f"tp{size} b{batch}", []).append(n / elapsed)
    engines[2].engine.close()
    result = {
        "model": shape,
        "device": args.device,
        "host": platform.processor() or platform.machine(),
        "threads": threads,
        "tokens": args.tokens,
        "tok_per_s": {k: statistics.median(v) for k, v in runs.items()},
        "runs": runs,
    }
    for key, value in result["tok_per_s"].items():
        print(f"{key:10s} {value:8.1f} tok/s")
    out = Path(args.out or "bench-results") / f"tensor_parallel-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
