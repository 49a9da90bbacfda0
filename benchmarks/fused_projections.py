"""Fused q/k/v and gate/up projections against HF's separate ones, side by side in one process.

    python benchmarks/fused_projections.py [--model demo] [--batch 1,8] [--tokens 128] [--repeats 5]

Loads the model twice (fused, as the engine does, and with HF's modules left alone), then alternates greedy
`ar` decoding of the same prompts on each, --repeats times per batch size; prints median tokens/s and the
ratio, checks both produce the same tokens (fp32), and writes fused_projections-<device>.json into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from branchwise import LLM, SamplingParams
from branchwise.models import loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fused = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=64)
    with mock.patch.object(loader, "fuse_projections", lambda model: False):
        separate = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=64)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    results = {}
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = [list(range(10 + b, 42 + b)) for b in range(batch)]
        speeds: dict[str, list[float]] = {"fused": [], "separate": []}
        outputs = {}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, llm in (("fused", fused), ("separate", separate)):
                start = time.perf_counter()
                outs = llm.generate(prompts, params)
                speeds[name].append(batch * args.tokens / (time.perf_counter() - start))
                outputs[name] = [o.outputs[0].token_ids for o in outs]
        row = {name: statistics.median(v[1:]) for name, v in speeds.items()}
        row["ratio"] = row["fused"] / row["separate"]
        row["same_tokens"] = outputs["fused"] == outputs["separate"]
        results[batch] = row
        print(
            f"batch {batch:3d}: fused {row['fused']:8.1f} tok/s, separate {row['separate']:8.1f} tok/s, "
            f"{row['ratio']:.2f}x, same tokens: {row['same_tokens']}"
        )
    device = fused.engine.device
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    out = Path(args.out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": name, "model": args.model, "tokens": args.tokens, "repeats": args.repeats}
    record["batches"] = results
    (out / f"fused_projections-{device.type}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
