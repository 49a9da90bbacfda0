"""`branchwise bench offline`: every strategy and the `transformers` baselines, side by side in one process.

For each batch size and strategy (batch 1: the first 4 prompts one after another): output tokens/s,
per-request latency and time to first token (p50/p99), mean accepted length and acceptance rate
(speculative), tokens per engine step (Multiverse's parallelism), and, when the dataset carries JSON
schemas, the same run constrained. Baselines at batch 1 on the same 4 prompts and max tokens: `generate`
(greedy), its assisted generation with the same draft model and its prompt-lookup mode. Each strategy's
ratio is against our `ar` and against `generate`, measured back to back.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from branchwise import LLM, SamplingParams
from branchwise.bench.datasets import load_records
from branchwise.bench.online import percentiles
from branchwise.constraints import Constraint

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SEQUENTIAL = 4  # prompts run one at a time at batch 1, by us and by the transformers baselines


def prompts_of(llm: LLM, records: list[dict]) -> list[list[int]]:
    return [llm.chat_prompt(r["messages"]) if "messages" in r else llm.encode(r["prompt"]) for r in records]


def run_batch(
    llm: LLM, prompts: list[list[int]], params: list[SamplingParams], strategy: str, batch: int | None = None
) -> dict:
    """Run the prompts `batch` at a time (default: all at once), stepping the engine to the end of each
    group; each request is timed from its group's start."""
    engine = llm.engine
    batch = batch or len(prompts)
    steps, wall = engine.num_steps, 0.0
    first, done, tokens, last = {}, {}, {}, {}
    for at in range(0, len(prompts), batch):
        start = time.perf_counter()
        for i in range(at, min(at + batch, len(prompts))):
            rid = f"bench-{strategy}-{i}-{time.monotonic_ns()}"
            tokens[rid] = 0
            engine.add_request(rid, prompts[i], params[i], strategy)
        while engine.has_unfinished():
            for u in engine.step():
                now = time.perf_counter()
                tokens[u.request_id] += len(u.token_ids)
                if u.token_ids and u.request_id not in first:
                    first[u.request_id] = now - start
                if u.finish_reason:
                    done[u.request_id] = now - start
                last[u.request_id] = u
        wall += time.perf_counter() - start
    drafts = sum(u.num_draft_steps for u in last.values())
    drafted = sum(u.num_drafted for u in last.values())
    accepted = sum(u.num_accepted for u in last.values())
    out = sum(tokens.values())
    return {
        "requests": len(prompts),
        "output_tokens": out,
        "tokens_per_s": out / wall,
        "wall_s": wall,
        "engine_steps": engine.num_steps - steps,
        "tokens_per_step": out / max(engine.num_steps - steps, 1),
        "latency_s": percentiles(list(done.values()), (50, 99)),
        "ttft_s": percentiles(list(first.values()), (50, 99)),
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "forced_tokens": sum(u.num_forced for u in last.values()),
        "errors": sum(1 for u in last.values() if u.error),
    }


def hf_baselines(
    path: str, draft: str | None, prompts: list[list[int]], max_tokens: int, k: int, device
) -> dict:
    """Batch-1 `generate`, assisted generation (draft model) and prompt lookup, tokens/s over `prompts`."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    assistant = AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).to(device).eval() if draft else None
    modes = {"hf_generate": {}, "hf_prompt_lookup": {"prompt_lookup_num_tokens": k}}
    if assistant is not None:
        modes["hf_assisted"] = {"assistant_model": assistant}
    result = {}
    for name, extra in modes.items():
        tokens, start = 0, time.perf_counter()
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            with torch.inference_mode():
                out = model.generate(ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=0, **extra)
            tokens += out.shape[1] - len(prompt)
        result[name] = {"output_tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - start)}
    return result


def bench_offline(
    model: str = "demo",
    strategies: tuple[str, ...] = ("ar", "draft", "ngram", "mtp", "medusa", "multiverse"),
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    dataset: str = "chat",
    max_tokens: int = 128,
    draft_model: str | None = None,
    device: str = "auto",
    baselines: bool = True,
    out: str | None = None,
) -> dict:
    llm = LLM(model, draft_model=draft_model, device=device, max_num_seqs=max(max(batch_sizes), 8))
    engine = llm.engine
    records = load_records(dataset)
    # every batch size runs at least SEQUENTIAL prompts (batch 1: one after another), the baselines' set
    count = max(max(batch_sizes), SEQUENTIAL)
    prompts = prompts_of(llm, (records * (count // len(records) + 1))[:count])
    rows = []
    strategies = tuple(s for s in strategies if _available(llm, s))
    levels = [
        (b, s, c)
        for b in batch_sizes
        for s in strategies
        for c in (False, True)
        if not c or "schema" in records[0]
    ]
    for batch, strategy, constrained in tqdm(levels, desc="bench offline"):
        n = max(batch, SEQUENTIAL)
        params = []
        for i in range(n):
            schema = records[i % len(records)].get("schema") if constrained else None
            c = Constraint.json_schema(schema) if schema else None
            params.append(SamplingParams(temperature=0, max_tokens=max_tokens, constraint=c))
        run_batch(llm, prompts[:n], params, strategy, batch)  # warm-up (and the adaptive-K cost model)
        row = run_batch(llm, prompts[:n], params, strategy, batch)
        rows.append({"batch": batch, "strategy": strategy, "constrained": constrained} | row)
    base = {}
    if baselines:
        base = hf_baselines(
            engine.model_path,
            engine.draft_path,
            prompts[:SEQUENTIAL],
            max_tokens,
            engine.config.num_speculative_tokens,
            engine.device,
        )
    for r in rows:
        ar = next(
            x
            for x in rows
            if x["batch"] == r["batch"] and x["strategy"] == "ar" and x["constrained"] == r["constrained"]
        )
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
        if "hf_generate" in base:
            r["speedup_vs_generate"] = r["tokens_per_s"] / base["hf_generate"]["tokens_per_s"]
    result = {
        "model": engine.model_path,
        "draft_model": engine.draft_path,
        "dataset": dataset,
        "max_tokens": max_tokens,
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
    path = Path(out) if out else RESULTS / f"bench_offline-{dataset}-{engine.device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))
    result["json_path"], result["png_path"] = str(path), str(path.with_suffix(".png"))
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
        llm.engine.strategy(strategy)
        return True
    except ValueError as e:  # e.g. no draft model, or a model without the Multiverse tags
        print(f"skipping {strategy}: {e}")
        return False


def format_table(result: dict) -> str:
    lines = [
        f"{'batch':>5} {'strategy':<11} {'constr':>6} {'tok/s':>9} {'x ar':>6} {'x gen':>6} "
        f"{'p50 lat':>8} {'p99 lat':>8} {'p50 ttft':>8} {'acc.len':>7} {'tok/step':>8}"
    ]
    for r in result["rows"]:
        acc = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
        gen = f"{r['speedup_vs_generate']:.2f}" if "speedup_vs_generate" in r else "-"
        lines.append(
            f"{r['batch']:>5} {r['strategy']:<11} {'yes' if r['constrained'] else 'no':>6} "
            f"{r['tokens_per_s']:>9.1f} {r['speedup_vs_ar']:>6.2f} {gen:>6} "
            f"{r['latency_s']['p50']:>8.3f} {r['latency_s']['p99']:>8.3f} {r['ttft_s']['p50']:>8.3f} "
            f"{acc:>7} {r['tokens_per_step']:>8.2f}"
        )
    for name, b in result["baselines"].items():
        lines.append(f"baseline {name}: {b['tokens_per_s']:.1f} tok/s (batch 1)")
    for depth, ranks in sorted(result.get("tree_acceptance", {}).items()):
        cells = ", ".join(
            f"rank {r}: {a:.0f}/{n:.0f}" for r, (a, n) in sorted(ranks.items(), key=lambda x: int(x[0]))
        )
        lines.append(f"medusa tree depth {depth} accepted/proposed: {cells}")
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
