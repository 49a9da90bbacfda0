"""Engine throughput: batch-1 decode vs `transformers` generate, and aggregate tokens/s under concurrency.

    python benchmarks/engine_throughput.py [--model PATH] [--concurrency 1,8,32] [--max-tokens 128]

Both sides run the same checkpoint in one process, back to back, each measured `--repeats` times; the
table reports medians. Results go to benchmarks/results/engine_throughput-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from branchwise import LLM, SamplingParams
from branchwise.models import demo
from branchwise.train.tokenizer import stdlib_files


def prompts_for(tokenizer, count: int, length: int = 32) -> list[list[int]]:
    ids = tokenizer.encode(stdlib_files(80)[60].read_text(), add_special_tokens=False)
    return [ids[i * 50 : i * 50 + length] for i in range(count)]


def time_branchwise(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def time_hf(model, prompt: list[int], max_tokens: int, device: str) -> tuple[float, int]:
    ids = torch.tensor([prompt], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        ids, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out.shape[1] - len(prompt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    path = demo.resolve(args.model)
    llm = LLM(path, device=args.device)
    device = llm.engine.device.type
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=llm.engine.dtype).to(device).eval()
    prompts = prompts_for(llm.tokenizer, max(int(c) for c in args.concurrency.split(",")))

    time_branchwise(llm, prompts[:2], 8)  # warm-up of both paths
    time_hf(hf, prompts[0], 8, device)
    bw, ref = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        t, n = time_branchwise(llm, prompts[:1], args.max_tokens)
        bw.append(n / t)
        t, n = time_hf(hf, prompts[0], args.max_tokens, device)
        ref.append(n / t)
    result = {
        "model": path,
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "batch1_decode_tokens_per_s": {
            "branchwise": statistics.median(bw),
            "hf_generate": statistics.median(ref),
        },
        "aggregate_tokens_per_s": {},
    }
    for c in [int(x) for x in args.concurrency.split(",")]:
        runs = []
        for _ in range(args.repeats):
            t, n = time_branchwise(llm, prompts[:c], args.max_tokens)
            runs.append(n / t)
        result["aggregate_tokens_per_s"][str(c)] = statistics.median(runs)

    b1 = result["batch1_decode_tokens_per_s"]
    print(f"\nmodel {path} on {device}, {args.max_tokens} new tokens, median of {args.repeats}")
    ratio = b1["branchwise"] / b1["hf_generate"]
    print(f"batch-1 decode  branchwise {b1['branchwise']:9.1f} tok/s   ", end="")
    print(f"transformers generate {b1['hf_generate']:9.1f} tok/s   ratio {ratio:.2f}x")
    for c, v in result["aggregate_tokens_per_s"].items():
        scale = v / result["aggregate_tokens_per_s"]["1"]
        print(f"concurrency {c:>3}  aggregate {v:9.1f} tok/s   ({scale:.1f}x batch 1)")
    out = Path(args.out or Path(__file__).parent / "results" / f"engine_throughput-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
