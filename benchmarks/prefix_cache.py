"""Prefix cache on a shared-system-prompt workload: hit rate and time to first token, cache on vs off.

    python benchmarks/prefix_cache.py [--model demo] [--requests 32] [--system-tokens 768]

Every request is one long system prompt (stdlib source) + its own short question; requests arrive one
after another (batch 1, the TTFT a user feels) and then all at once. Both engines run in one process,
interleaved, medians of --repeats. Results: benchmarks/results/prefix_cache-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from branchwise import LLM, SamplingParams
from branchwise.bench.offline import run_batch
from branchwise.train.demo_data import arithmetic
from branchwise.train.tokenizer import stdlib_files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    engines = {"cache": LLM(args.model), "no_cache": LLM(args.model, prefix_cache=False)}
    tok = engines["cache"].tokenizer
    system = tok.decode(
        tok.encode(stdlib_files(80)[70].read_text(), add_special_tokens=False)[: args.system_tokens]
    )
    rng = random.Random(0)
    prompts = [
        engines["cache"].chat_prompt(
            [{"role": "system", "content": system}, {"role": "user", "content": arithmetic(rng)[0]}]
        )
        for _ in range(args.requests)
    ]
    params = [SamplingParams(temperature=0, max_tokens=16)] * args.requests
    runs: dict[str, dict[str, list]] = {
        name: {"sequential_ttft": [], "batch_ttft": [], "batch_tps": []} for name in engines
    }
    for _ in range(args.repeats):
        for name, llm in engines.items():
            if llm.engine.prefix_cache is not None:  # each repeat starts cold: the first request fills it
                llm.engine.prefix_cache.evict(llm.engine.num_blocks)
            ttft = [run_batch(llm, [p], params[:1], "ar")["ttft_s"]["p50"] for p in prompts]
            runs[name]["sequential_ttft"].append(statistics.median(ttft))
            if llm.engine.prefix_cache is not None:
                llm.engine.prefix_cache.evict(llm.engine.num_blocks)
            batch = run_batch(llm, prompts, params, "ar")
            runs[name]["batch_ttft"].append(batch["ttft_s"]["p50"])
            runs[name]["batch_tps"].append(batch["tokens_per_s"])
    metrics = engines["cache"].engine.metrics
    counts = {
        m.name: sum(s.value for s in m.samples if s.name.endswith("_total"))
        for m in metrics.registry.collect()
    }
    hit_rate = counts["branchwise:prefix_cache_hits"] / counts["branchwise:prefix_cache_queries"]
    result = {
        "model": engines["cache"].engine.model_path,
        "requests": args.requests,
        "prompt_tokens": statistics.mean(len(p) for p in prompts),
        "hit_rate": hit_rate,
        **{f"{name}_{k}": statistics.median(v) for name, r in runs.items() for k, v in r.items()},
    }
    for k, v in result.items():
        print(f"{k:>28}: {v}")
    out = Path(
        args.out
        or Path(__file__).parent / "results" / f"prefix_cache-{engines['cache'].engine.device.type}.json"
    )
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
