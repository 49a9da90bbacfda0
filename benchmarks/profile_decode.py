"""Where a batch-1 decode step's GPU time goes: the kernels of the graph-replayed target forward.

    python benchmarks/profile_decode.py [--shape qwen2-1.5b] [--tokens 64]

Builds the same random-weight checkpoint as `gpu_decode.py`, starts the engine with CUDA graphs, decodes
one request under torch.profiler and prints the kernels by total GPU time, and the step's GPU time per
token against the bandwidth bound.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from gpu_decode import bandwidth, build_checkpoint, model_bytes
from torch.profiler import ProfilerActivity, profile

from branchwise import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2-1.5b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    path = build_checkpoint(args.shape, Path(f"/tmp/branchwise-{args.shape}"))
    llm = LLM(str(path), max_num_seqs=8, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    prompt = list(range(100, 164))
    llm.generate([prompt], params)  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params)
    torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    gpu_us = sum(e.self_device_time_total for e in averages)
    bound_ms = model_bytes(llm.engine.model) / bandwidth() * 1e3
    print(f"GPU time per token {gpu_us / 1e3 / args.tokens:.3f} ms; bandwidth bound {bound_ms:.3f} ms")


if __name__ == "__main__":
    main()
