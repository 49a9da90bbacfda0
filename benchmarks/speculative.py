"""Speculative strategies vs autoregressive decoding: tokens/s and mean accepted length per batch size.

    python benchmarks/speculative.py [--model demo] [--draft-model PATH] [--batch 1,16,64] [--repeats 3]

One engine serves every strategy (they are per request), so each ratio is measured side by side in one
process; runs are interleaved (ar, draft, ngram, ar, ...) so drift in machine load hits all alike, and the
table reports medians. Speculation uses its adaptive K (the default a server runs with). Prompts are the
demo model's chat tasks (extraction and arithmetic, generated from a seed) or, with `--prompts code`,
windows of stdlib source. Results: benchmarks/results/speculative-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from branchwise import LLM, SamplingParams
from branchwise.bench.offline import tree_acceptance
from branchwise.train.demo_data import arithmetic, extraction
from branchwise.train.tokenizer import stdlib_files


def chat_prompts(llm: LLM, count: int, seed: int = 1234) -> list[list[int]]:
    rng = random.Random(seed)
    messages = [extraction(rng)[0] if i % 2 else arithmetic(rng)[0] for i in range(count)]
    return [llm.chat_prompt([{"role": "user", "content": m}]) for m in messages]


def code_prompts(llm: LLM, count: int, length: int = 64) -> list[list[int]]:
    ids = llm.tokenizer.encode(stdlib_files(80)[60].read_text(), add_special_tokens=False)
    return [ids[i * 50 : i * 50 + length] for i in range(count)]


def run(llm: LLM, prompts: list[list[int]], strategy: str, max_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, strategy=strategy)
    elapsed = time.perf_counter() - start
    done = [c for o in outs for c in o.outputs]
    steps = sum(c.num_draft_steps for c in done)
    return {
        "tokens_per_s": sum(len(c.token_ids) for c in done) / elapsed,
        "mean_accepted_length": 1 + sum(c.num_accepted for c in done) / steps if steps else 1.0,
        "drafted_per_step": sum(c.num_drafted for c in done) / steps if steps else 0.0,
        "outputs": [c.token_ids for c in done],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--draft-model", default=None, help="default: the demo model's own draft")
    ap.add_argument("--batch", default="1,16,64", help="comma-separated numbers of concurrent requests")
    ap.add_argument("--strategies", default="ar,draft,ngram,mtp,medusa")
    ap.add_argument("--prompts", choices=["chat", "code"], default="chat")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="every run prefills its prompts (an 'mtp' run otherwise reuses blocks 'ar' computed, which "
        "hold no module entries)",
    )
    args = ap.parse_args()

    llm = LLM(
        args.model,
        draft_model=args.draft_model,
        device=args.device,
        max_num_seqs=256,
        prefix_cache=not args.no_prefix_cache,
    )
    strategies = args.strategies.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    make = chat_prompts if args.prompts == "chat" else code_prompts
    prompts = make(llm, max(batches))
    rows = []
    for batch in batches:
        for s in strategies:  # warm-up: graphs, and the adaptive-K cost model sees this load
            run(llm, prompts[:batch], s, 16)
        results: dict[str, list[dict]] = {s: [] for s in strategies}
        for _ in range(args.repeats):
            for s in strategies:
                results[s].append(run(llm, prompts[:batch], s, args.max_tokens))
        ar_outputs = results["ar"][0]["outputs"] if "ar" in results else None
        for s in strategies:
            lossless = ar_outputs is None or all(r["outputs"] == ar_outputs for r in results[s])
            row = {
                "batch": batch,
                "strategy": s,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results[s]),
                "runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in results[s]],
                "mean_accepted_length": statistics.median(r["mean_accepted_length"] for r in results[s]),
                "drafted_per_step": statistics.median(r["drafted_per_step"] for r in results[s]),
                "same_tokens_as_ar": lossless,
            }
            rows.append(row)
            print(
                f"batch {batch:>3}  {s:<6} {row['tokens_per_s']:>9.1f} tok/s  "
                f"accepted length {row['mean_accepted_length']:.2f}  "
                f"drafted/step {row['drafted_per_step']:.2f}  same tokens as ar: {lossless}",
                flush=True,
            )
    for batch in batches:
        base = next((r for r in rows if r["batch"] == batch and r["strategy"] == "ar"), None)
        for r in rows:
            if base and r["batch"] == batch:
                r["speedup_vs_ar"] = r["tokens_per_s"] / base["tokens_per_s"]
    engine = llm.engine
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "model": engine.model_path,
        "draft_model": engine.resources["draft"].path if "draft" in engine.resources else None,
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "prefix_cache": engine.config.prefix_cache,
        "rows": rows,
        "tree_acceptance": tree_acceptance(engine),
    }
    name = "cuda" if engine.device.type == "cuda" else "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"speculative-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
