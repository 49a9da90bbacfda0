"""`branchwise bench offline`: every strategy and the `transformers` baselines, side by side in one process.

Cells are (batch size, strategy, constrained or not); at batch 1 the first 4 prompts run one after
another. Every cell and baseline runs once to warm up (which also sizes it: enough passes over its prompts
for `min_tokens` output tokens), then `repeats` rounds run every cell and baseline in turn, so drift in
machine load hits all alike. The table gives each cell's median tokens/s with its min-max over the rounds,
the ratio to our `ar` and to `generate` (medians of the same rounds), the median of each round's ratio to
that round's `ar` (paired: drift between rounds cancels), latency and TTFT p50/p99, mean
accepted length (speculative), tokens per engine step, and whether its tokens equalled `ar`'s. Baselines
at batch 1 on the same prompts: `generate` (greedy), its assisted generation with the same draft model and
its prompt-lookup mode.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from branchwise import LLM, SamplingParams
from branchwise.bench import percentiles
from branchwise.bench.datasets import load_records
from branchwise.constraints import Constraint

SEQUENTIAL = 4  # prompts run one at a time at batch 1, by us and by the transformers baselines
ASYNC_AR = {"ar-async": "ar"}  # a row: `ar` with async scheduling, beside `ar` in the same run


def prompts_of(llm: LLM, records: list[dict]) -> list[list[int]]:
    return [
        llm.chat_prompt(r["messages"], r.get("tools")) if "messages" in r else llm.encode(r["prompt"])
        for r in records
    ]


def run_batch(
    llm: LLM, prompts: list[list[int]], params: list[SamplingParams], strategy: str, batch: int | None = None
) -> dict:
    """Run the prompts `batch` at a time (default: all at once), stepping the engine to the end of each
    group; each request is timed from its group's start."""
    engine = llm.engine
    batch = batch or len(prompts)
    steps, deferred, wall = engine.num_steps, engine.num_deferred, 0.0
    first, done, tokens, last, order = {}, {}, {}, {}, []
    for at in range(0, len(prompts), batch):
        start = time.perf_counter()
        for i in range(at, min(at + batch, len(prompts))):
            rid = f"bench-{strategy}-{i}-{time.monotonic_ns()}"
            tokens[rid] = []
            order.append(rid)
            engine.add_request(rid, prompts[i], params[i], strategy)
        while engine.has_unfinished():
            for u in engine.step():
                now = time.perf_counter()
                tokens[u.request_id] += u.token_ids
                if u.token_ids and u.request_id not in first:
                    first[u.request_id] = now - start
                if u.finish_reason:
                    done[u.request_id] = now - start
                last[u.request_id] = u
        wall += time.perf_counter() - start
    drafts = sum(u.num_draft_steps for u in last.values())
    drafted = sum(u.num_drafted for u in last.values())
    accepted = sum(u.num_accepted for u in last.values())
    out = sum(len(t) for t in tokens.values())
    return {
        "requests": len(prompts),
        "output_tokens": out,
        "tokens_per_s": out / wall,
        "wall_s": wall,
        "engine_steps": engine.num_steps - steps,
        "tokens_per_step": out / max(engine.num_steps - steps, 1),
        "deferred_tokens": engine.num_deferred - deferred,  # read back a step later (async scheduling)
        "latency_s": percentiles(list(done.values()), (50, 99)),
        "ttft_s": percentiles(list(first.values()), (50, 99)),
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "forced_tokens": sum(u.num_forced for u in last.values()),
        "errors": sum(1 for u in last.values() if u.error),
        "outputs": [tokens[r] for r in order],
    }


class Baselines:
    """Batch-1 `generate`, assisted generation (same draft model) and prompt lookup, one mode at a time."""

    def __init__(self, path: str, draft: str | None, k: int, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval()  # noqa: E731
        self.model, self.device = load(path), device
        self.modes: dict[str, dict] = {"hf_generate": {}, "hf_prompt_lookup": {"prompt_lookup_num_tokens": k}}
        if draft:
            self.modes["hf_assisted"] = {"assistant_model": load(draft)}

    def run(self, mode: str, prompts: list[list[int]], max_tokens: int) -> dict:
        tokens, start = 0, time.perf_counter()
        for prompt in prompts:
            ids = torch.tensor([prompt], device=self.device)
            with torch.inference_mode():
                out = self.model.generate(
                    ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=0, **self.modes[mode]
                )
            tokens += out.shape[1] - len(prompt)
        return {"output_tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - start)}


def spread(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "min": min(values), "max": max(values)}


def bench_offline(
    model: str = "demo",
    strategies: tuple[str, ...] = ("ar", "draft", "ngram", "suffix", "mtp", "medusa", "multiverse"),
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    dataset: str = "chat",
    max_tokens: int = 128,
    draft_model: str | None = None,
    device: str = "auto",
    baselines: bool = True,
    out: str | None = None,
    repeats: int = 3,
    min_tokens: int = 2048,
) -> dict:
    plot_too = importlib.util.find_spec("matplotlib") is not None
    if not plot_too:  # said before the run, not after it
        print("matplotlib is not installed: no plot this run (pip install 'branchwise[bench]')")
    llm = LLM(model, draft_model=draft_model, device=device, max_num_seqs=max(max(batch_sizes), 8))
    engine = llm.engine
    draft_path = engine.resources["draft"].path if "draft" in engine.resources else None
    path = Path(out) if out else Path.cwd() / "bench-results" / time.strftime("%Y%m%d-%H%M%S")
    path = path if path.suffix == ".json" else path / f"bench_offline-{dataset}-{engine.device.type}.json"
    records = load_records(dataset)
    prompts = prompts_of(llm, records)
    strategies = tuple(s for s in strategies if _available(llm, s))
    cells = [
        (b, s, c)
        for b in batch_sizes
        for s in strategies
        for c in (False, True)
        if not c or "schema" in records[0]
    ]

    def cycled(count: int) -> list[int]:
        """Passes go on through the dataset rather than repeating its first prompts: a strategy that learns
        from earlier outputs (suffix) must not be handed the same request twice in a run."""
        return [i % len(prompts) for i in range(count)]

    def work(cell, passes: int) -> dict:
        batch, strategy, constrained = cell
        picked = cycled(max(batch, SEQUENTIAL) * passes)
        params = []
        for i in picked:
            schema = records[i].get("schema") if constrained else None
            c = Constraint.json_schema(schema) if schema else None
            # as `LLM.generate` and non-streaming requests: the text comes whole at the end
            params.append(
                SamplingParams(temperature=0, max_tokens=max_tokens, constraint=c, output_kind="final_only")
            )
        name = ASYNC_AR.get(strategy, strategy)
        engine.strategy(name).reset_cache()  # every run starts cold: rounds repeat the same prompts
        engine.config.async_scheduling = strategy in ASYNC_AR
        try:
            return run_batch(llm, [prompts[i] for i in picked], params, name, batch)
        finally:
            engine.config.async_scheduling = False

    hf = None
    if baselines:
        k = engine.config.num_speculative_tokens
        hf = Baselines(
            engine.model_path,
            engine.resources["draft"].path if "draft" in engine.resources else None,
            k,
            engine.device,
        )
    passes, hf_passes = {}, {}
    for cell in tqdm(cells, desc="warm-up"):  # also the adaptive controllers' first estimates
        passes[cell] = max(1, math.ceil(min_tokens / max(work(cell, 1)["output_tokens"], 1)))
    for mode in hf.modes if hf else ():
        tokens = hf.run(mode, [prompts[i] for i in cycled(SEQUENTIAL)], max_tokens)["output_tokens"]
        hf_passes[mode] = max(1, math.ceil(min_tokens / max(tokens, 1)))
    runs: dict = {cell: [] for cell in cells}
    hf_runs: dict[str, list[float]] = {mode: [] for mode in hf_passes}
    for _ in tqdm(range(repeats), desc="rounds"):
        for cell in cells:
            runs[cell].append(work(cell, passes[cell]))
        for mode in hf_runs:
            result = hf.run(mode, [prompts[i] for i in cycled(SEQUENTIAL * hf_passes[mode])], max_tokens)
            hf_runs[mode].append(result["tokens_per_s"])
    rows = []
    for cell, results in runs.items():
        batch, strategy, constrained = cell
        rates = [r["tokens_per_s"] for r in results]
        median = sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]
        row = {"batch": batch, "strategy": strategy, "constrained": constrained} | median
        row["prompts_repeated"] = len(median["outputs"]) > len(prompts)  # a pass wrapped around the set
        row |= {
            "tokens_per_s": statistics.median(rates),
            "tokens_per_s_spread": spread(rates),
            "rounds": rates,
        }
        rows.append(row)
    base = {
        mode: {"tokens_per_s": statistics.median(v), "tokens_per_s_spread": spread(v)}
        for mode, v in hf_runs.items()
    }
    for r in rows:
        ar = next(
            x
            for x in rows
            if x["batch"] == r["batch"] and x["strategy"] == "ar" and x["constrained"] == r["constrained"]
        )
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
        # each round's ratio to the `ar` run of the same round, median: the machine's drift between
        # rounds cancels (on a shared machine single rounds of one cell spread by 20 % and more)
        r["speedup_vs_ar_paired"] = statistics.median(
            x / y for x, y in zip(r["rounds"], ar["rounds"], strict=True)
        )
        r["same_tokens_as_ar"] = r["outputs"] == ar["outputs"]
        if "hf_generate" in base:
            r["speedup_vs_generate"] = r["tokens_per_s"] / base["hf_generate"]["tokens_per_s"]
    for r in rows:
        del r["outputs"]
    result = {
        "model": engine.model_path,
        "draft_model": draft_path,
        "dataset": dataset,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "min_tokens": min_tokens,
        "device": torch.cuda.get_device_name()
        if engine.device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "config": engine.config.model_dump(),
        "rows": rows,
        "baselines": base,
        "tree_acceptance": tree_acceptance(engine),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    result["json_path"] = str(path)
    if plot_too:
        plot(result, path.with_suffix(".png"))
        result["png_path"] = str(path.with_suffix(".png"))
    return result


def tree_acceptance(engine) -> dict[str, dict[str, list[float]]]:
    """Medusa trees over the whole run: depth -> rank -> [accepted, proposed] nodes (from /metrics)."""
    table: dict[str, dict[str, list[float]]] = {}
    for column, counter in enumerate((engine.metrics.tree_accepted, engine.metrics.tree_proposed)):
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    depth = table.setdefault(sample.labels["depth"], {})
                    depth.setdefault(sample.labels["rank"], [0, 0])[column] = sample.value
    return table


def _available(llm: LLM, strategy: str) -> bool:
    try:
        llm.engine.strategy(ASYNC_AR.get(strategy, strategy))
        return True
    except ValueError as e:  # e.g. no draft model, or a model without the Multiverse tags
        print(f"skipping {strategy}: {e}")
        return False


def format_table(result: dict) -> str:
    lines = [
        f"{'batch':>5} {'strategy':<11} {'constr':>6} {'tok/s p50 (min-max)':>21} {'x ar':>6} {'paired':>6} "
        f"{'x gen':>6} "
        f"{'=ar':>4} {'p50 lat':>8} {'p99 lat':>8} {'p50 ttft':>8} {'acc.len':>7} {'tok/step':>8}"
    ]
    for r in result["rows"]:
        acc = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
        gen = f"{r['speedup_vs_generate']:.2f}" if "speedup_vs_generate" in r else "-"
        sp = r["tokens_per_s_spread"]
        rate = f"{sp['p50']:.1f} ({sp['min']:.0f}-{sp['max']:.0f})"
        lines.append(
            f"{r['batch']:>5} {r['strategy']:<11} {'yes' if r['constrained'] else 'no':>6} {rate:>21} "
            f"{r['speedup_vs_ar']:>6.2f} {r['speedup_vs_ar_paired']:>6.2f} {gen:>6} "
            f"{'yes' if r['same_tokens_as_ar'] else 'NO':>4} "
            f"{r['latency_s']['p50']:>8.3f} {r['latency_s']['p99']:>8.3f} {r['ttft_s']['p50']:>8.3f} "
            f"{acc:>7} {r['tokens_per_step']:>8.2f}"
        )
    for name, b in result["baselines"].items():
        sp = b["tokens_per_s_spread"]
        lines.append(f"baseline {name}: {sp['p50']:.1f} tok/s ({sp['min']:.0f}-{sp['max']:.0f}, batch 1)")
    for depth, ranks in sorted(result.get("tree_acceptance", {}).items()):
        cells = ", ".join(
            f"rank {r}: {a:.0f}/{n:.0f}" for r, (a, n) in sorted(ranks.items(), key=lambda x: int(x[0]))
        )
        lines.append(f"medusa tree depth {depth} accepted/proposed: {cells}")
    lines.append(
        f"{result['repeats']} interleaved rounds after a warm-up; each cell >= {result['min_tokens']} "
        "tokens; x ar: ratio of medians, paired: median of each round's ratio to that round's ar"
    )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r["constrained"]]
    strategies = sorted({r["strategy"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(strategies), 1)
    for i, s in enumerate(strategies):
        tps = [
            next((r["tokens_per_s"] for r in rows if r["batch"] == b and r["strategy"] == s), 0)
            for b in batches
        ]
        lat = [
            next((r["latency_s"]["p50"] for r in rows if r["batch"] == b and r["strategy"] == s), 0)
            for b in batches
        ]
        x = [j + i * width for j in range(len(batches))]
        ax1.bar(x, tps, width, label=s)
        ax2.bar(x, lat, width, label=s)
    for ax, title in ((ax1, "output tokens/s"), (ax2, "p50 request latency (s)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_title(title)
    ax1.legend()
    fig.suptitle(f"{Path(result['model']).name} on {result['device']} ({result['dataset']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
