"""Host instructions per decode step, counted under valgrind rather than timed: the same on a noisy machine.

    python benchmarks/host_instructions.py [--batch 1,8,32] [--tokens 64] [--repeats 2] [--source PATH]

The workload is host_overhead.py's: greedy `ar` decoding on a tiny random 1-layer model, with one torch
thread. One process per batch size decodes the same prompts `2 * repeats + 2` times under callgrind, which
counts only the marked runs: `repeats` plain ones, then (after one unmarked run of each kind) `repeats` with
every decoder forward run twice. A plain run's instructions per step are the step's; the twice-run's extra
are the forward's; the host's share is the rest. Both kinds run in one process, so they share its model,
its buffers and its alignments: the spread of two separate processes (MKL's kernels count differently with
the buffers they get) does not enter the difference. Each repeat is reported, so the spread that is left
shows.

--source measures another checkout, because its `branchwise` goes first on the path. An example is a
`git worktree` of an older commit. Needs valgrind. Each batch size takes a few minutes; two run at once.
Writes host_instructions-cpu.json into --out.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MARKER = "qsort_r"  # callgrind counts inside it only: a run is marked by calling it through libc's qsort


def marked(run, dumps: Path) -> str:
    """Call `run` inside libc's qsort (its comparison callback), so that callgrind counts it; its dump."""
    before = set(os.listdir(dumps))

    def call(a, b) -> int:
        run()
        return 0

    compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(call)
    two = (ctypes.c_int * 2)(0, 1)
    ctypes.CDLL(None).qsort(two, 2, ctypes.sizeof(ctypes.c_int), compare)
    new = set(os.listdir(dumps)) - before
    if len(new) != 1:  # something else sorted with qsort inside the run
        raise RuntimeError(f"{MARKER} ran more than once in a marked run: its count is not the run's")
    return new.pop()


def instrument() -> None:
    """Have callgrind instrument from here on (start-up runs uninstrumented: minutes faster)."""
    ctl = subprocess.Popen(["callgrind_control", "-i", "on", str(os.getpid())], stdout=subprocess.DEVNULL)
    while ctl.poll() is None:  # busy: valgrind takes the command while this process runs code
        sum(range(1000))
    if ctl.returncode:
        raise RuntimeError("callgrind_control could not switch instrumentation on")


def workload(batch: int, tokens: int, repeats: int, dumps: Path) -> None:
    """Decode in this process (under callgrind); prints the steps of every marked run."""
    import torch

    torch.set_num_threads(1)
    from branchwise import LLM, SamplingParams
    from branchwise.train.tiny import build_tiny_checkpoint

    torch.manual_seed(0)
    path = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "qwen2", num_layers=1)
    llm = LLM(str(path), device="cpu", max_num_seqs=64)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [list(range(10 + b, 42 + b)) for b in range(batch)]
    runner = llm.engine.runner
    run_decoder = type(runner).run_decoder

    def run_twice(self, ids, meta):
        run_decoder(self, ids, meta)
        return run_decoder(self, ids, meta)

    instrument()
    for kind in ("plain", "twice"):
        if kind == "twice":
            runner.run_decoder = run_twice.__get__(runner)
        llm.generate(prompts, params)  # unmarked: first-run costs of this kind stay out
        for _ in range(repeats):
            first = llm.engine.num_steps
            dump = marked(lambda: llm.generate(prompts, params), dumps)
            print(kind, llm.engine.num_steps - first, dump, flush=True)


def count(source: str | None, batch: int, tokens: int, repeats: int) -> dict:
    """Instructions per step of each marked run of one batch size."""
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if source:
        env["PYTHONPATH"] = str(Path(source).resolve())
    with tempfile.TemporaryDirectory() as dumps:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no"]
        cmd += [f"--toggle-collect={MARKER}"]
        cmd += [f"--dump-after={MARKER}", f"--callgrind-out-file={dumps}/cg.%n"]
        cmd += [sys.executable, __file__, "--child", f"{batch},{tokens},{repeats}", "--dumps", dumps]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the workload failed:\n{done.stderr[-3000:]}")
        per_step = {"plain": [], "twice": []}
        for kind, steps, dump in re.findall(r"^(plain|twice) (\d+) (\S+)$", done.stdout, re.M):
            total = re.search(r"^totals: (\d+)", (Path(dumps) / dump).read_text(), re.M)
            per_step[kind].append(int(total.group(1)) / int(steps))
    return per_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--source", default=None, help="a checkout whose branchwise package to measure")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dumps", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        batch, tokens, repeats = (int(x) for x in args.child.split(","))
        return workload(batch, tokens, repeats, Path(args.dumps))
    batches = [int(b) for b in args.batch.split(",")]
    with ThreadPoolExecutor(2) as pool:
        counts = pool.map(lambda b: count(args.source, b, args.tokens, args.repeats), batches)
        found = dict(zip(batches, counts, strict=True))
    results = {}
    for b in batches:
        plain, twice = found[b]["plain"], found[b]["twice"]
        step, forward = statistics.median(plain), statistics.median(twice) - statistics.median(plain)
        results[b] = {"step": step, "forward": forward, "host": step - forward}
        results[b] |= {"plain": plain, "twice": twice}
        print(
            f"batch {b:3d}: {step / 1e6:.2f} M instructions a step, forward {forward / 1e6:.2f} M, "
            f"host {(step - forward) / 1e6:.2f} M "
            f"(plain runs {', '.join(f'{x / 1e6:.3f}' for x in plain)} M, "
            f"twice {', '.join(f'{x / 1e6:.3f}' for x in twice)} M)",
            flush=True,
        )
    out = Path(args.out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    record = {"source": args.source or "this checkout", "tokens": args.tokens, "batches": results}
    (out / "host_instructions-cpu.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
