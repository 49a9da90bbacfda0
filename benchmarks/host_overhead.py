"""The engine's host time per decode step: everything a step does besides the model's decoder forward.

    python benchmarks/host_overhead.py [--batch 1,8,32] [--tokens 128] [--repeats 5]

On a GPU with CUDA graphs the decoder forward is one graph replay, and what the host does around it
(scheduling, packing, staging, sampling, commit, detokenizing, metrics) adds to every token's latency. On
the CPU that host work can be measured apart: a tiny random 1-layer model makes the forward small, and
the script times the decoder forward separately and reports step time minus forward time (median of
--repeats runs of greedy decoding, `ar` strategy). Writes host_overhead-<device>.json into --out.
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
from branchwise.engine.model_runner import ModelRunner
from branchwise.train.tiny import build_tiny_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    path = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "qwen2", num_layers=1)
    llm = LLM(str(path), device=args.device, max_num_seqs=64)
    runner = llm.engine.runner
    forward_seconds = [0.0]
    run_decoder = ModelRunner.run_decoder

    def timed(self, ids, meta):
        start = time.perf_counter()
        hidden = run_decoder(self, ids, meta)
        if hidden.is_cuda:
            torch.cuda.synchronize()
        forward_seconds[0] += time.perf_counter() - start
        return hidden

    runner.run_decoder = timed.__get__(runner)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    results = {}
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = [list(range(10 + b, 42 + b)) for b in range(batch)]
        llm.generate(prompts, params)  # warm-up
        host_ms, step_ms = [], []
        for _ in range(args.repeats):
            forward_seconds[0], steps = 0.0, llm.engine.num_steps
            start = time.perf_counter()
            llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            steps = llm.engine.num_steps - steps
            step_ms.append(elapsed / steps * 1e3)
            host_ms.append((elapsed - forward_seconds[0]) / steps * 1e3)
        step, host = statistics.median(step_ms), statistics.median(host_ms)
        results[batch] = {"step_ms": step, "host_ms": host}
        print(f"batch {batch:3d}: step {step:.3f} ms, host {host:.3f} ms")
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    out = Path(args.out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": device, "tokens": args.tokens, "repeats": args.repeats, "batches": results}
    (out / f"host_overhead-{args.device}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
