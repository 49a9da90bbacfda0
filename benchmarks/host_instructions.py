"""Host instructions per decode step, counted under valgrind rather than timed: the same on a noisy machine.

    python benchmarks/host_instructions.py [--batch 1,8,32] [--tokens 64] [--source PATH]

The workload is host_overhead.py's: greedy `ar` decoding on a tiny random 1-layer model, with one torch
thread. It is counted after 1 and after 3 runs of the same prompts, so the difference per step is one step's
instructions. It is counted again with every decoder forward run twice, and that difference is the
forward's. The host's share is the rest.

--source measures another checkout, because its `branchwise` goes first on the path. An example is a
`git worktree` of an older commit. Needs valgrind. Each count takes a minute or two; two run at once.
Writes host_instructions-cpu.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def workload(batch: int, tokens: int, runs: int, twice: bool) -> None:
    """Decode in this process (under valgrind); prints the engine's step count."""
    import torch

    torch.set_num_threads(1)
    from branchwise import LLM, SamplingParams
    from branchwise.train.tiny import build_tiny_checkpoint

    torch.manual_seed(0)
    path = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "qwen2", num_layers=1)
    llm = LLM(str(path), device="cpu", max_num_seqs=64)
    if twice:
        runner = llm.engine.runner
        run_decoder = type(runner).run_decoder

        def run_twice(self, ids, meta):
            run_decoder(self, ids, meta)
            return run_decoder(self, ids, meta)

        runner.run_decoder = run_twice.__get__(runner)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [list(range(10 + b, 42 + b)) for b in range(batch)]
    for _ in range(runs):
        llm.generate(prompts, params)
    print("steps", llm.engine.num_steps)


def count(source: str | None, batch: int, tokens: int, runs: int, twice: bool) -> tuple[int, int]:
    """(instructions, steps) of one workload run under cachegrind."""
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if source:
        env["PYTHONPATH"] = str(Path(source).resolve())
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    cmd += [sys.executable, __file__, "--child", f"{batch},{tokens},{runs},{int(twice)}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    refs = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    steps = re.search(r"^steps (\d+)", done.stdout, re.M)
    if refs is None or steps is None:
        raise RuntimeError(f"no count from valgrind:\n{done.stderr[-2000:]}")
    return int(refs.group(1).replace(",", "")), int(steps.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--source", default=None, help="a checkout whose branchwise package to measure")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        batch, tokens, runs, twice = (int(x) for x in args.child.split(","))
        return workload(batch, tokens, runs, bool(twice))
    batches = [int(b) for b in args.batch.split(",")]
    jobs = [(b, runs, twice) for b in batches for twice in (False, True) for runs in (1, 3)]
    with ThreadPoolExecutor(2) as pool:
        found = pool.map(lambda job: count(args.source, job[0], args.tokens, *job[1:]), jobs)
        counts = dict(zip(jobs, found, strict=True))
    results = {}
    for b in batches:
        per_step = {}
        for twice in (False, True):
            (ir1, steps1), (ir3, steps3) = counts[(b, 1, twice)], counts[(b, 3, twice)]
            per_step[twice] = (ir3 - ir1) / (steps3 - steps1)
        step, forward = per_step[False], per_step[True] - per_step[False]
        results[b] = {"step": step, "forward": forward, "host": step - forward}
        print(
            f"batch {b:3d}: {step / 1e6:.2f} M instructions a step, forward {forward / 1e6:.2f} M, "
            f"host {(step - forward) / 1e6:.2f} M",
            flush=True,
        )
    out = Path(args.out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    record = {"source": args.source or "this checkout", "tokens": args.tokens, "batches": results}
    (out / "host_instructions-cpu.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
