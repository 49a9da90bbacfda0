"""How decode cost grows with context: our `ar` vs `transformers` `generate`, side by side, batch 1.

    python benchmarks/context_scaling.py [--lengths 128,1024,3072,6144] [--new-tokens 32] [--repeats 3]

A random 4-layer Llama (hidden 512, 8 heads, 4 KV heads), prompts of random tokens of each length, greedy,
--new-tokens new tokens (ignore_eos; generate with min_new_tokens so both write the same count). Rounds
interleave the two; the table gives the median seconds of each and our time / generate's time. Writes
context_scaling-<device>.json into --out.
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
from transformers import AutoModelForCausalLM

from branchwise import LLM, SamplingParams
from branchwise.train.tiny import build_tiny_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,1024,3072,6144")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    shape = dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, init_std=0.02)
    max_len = max(lengths) + args.new_tokens + 16
    path = str(
        build_tiny_checkpoint(
            Path(tempfile.mkdtemp()) / "ctx", "llama", max_position_embeddings=max_len, **shape
        )
    )
    blocks = -(-max_len // 16) + 8
    # no prefix cache: every round prefills afresh, as generate does
    llm = LLM(path, device=args.device, max_model_len=max_len, num_blocks=blocks, prefix_cache=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    times: dict[str, dict[str, list[float]]] = {}
    for n in lengths:
        prompt = torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        ours, theirs = [], []
        llm.generate([prompt[:64]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = llm.generate([prompt], params)
            ours.append(time.perf_counter() - start)
            assert len(out[0].outputs[0].token_ids) == args.new_tokens
            start = time.perf_counter()
            with torch.inference_mode():
                hf.generate(torch.tensor([prompt], device=args.device), **gen)
            theirs.append(time.perf_counter() - start)
        times[str(n)] = {"branchwise": ours, "generate": theirs}
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"{n:6d} tokens  ours {a:7.3f} s  generate {b:7.3f} s  ratio {a / b:5.2f}", flush=True)
    result = {
        "model": shape,
        "device": args.device,
        "host": platform.processor() or platform.machine(),
        "new_tokens": args.new_tokens,
        "ratio": {
            n: statistics.median(t["branchwise"]) / statistics.median(t["generate"]) for n, t in times.items()
        },
        "seconds": times,
    }
    out = Path(args.out or "bench-results") / f"context_scaling-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
