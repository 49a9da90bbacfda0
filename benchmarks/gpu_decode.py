"""GPU decode benchmark: branchwise (Triton + CUDA graphs) vs `transformers`, against the bandwidth bound.

    python benchmarks/gpu_decode.py [--shape qwen2-1.5b] [--tokens 256] [--out benchmarks/results]

One process, one run: builds a random-weight model with the shape of a real checkpoint (speed does not
depend on the weights' values), then measures, each as the median of --repeats runs:
- the device's memory bandwidth (a large device-to-device copy, bytes read + written) and the model's bytes,
  whose ratio bounds batch-1 decode: every weight is read once per token;
- batch-1 decode tokens/s of branchwise (also with async scheduling, rounds interleaved), of `generate`
  (eager, dynamic cache) and of `generate` with a static cache and torch.compile (mode reduce-overhead);
- aggregate tokens/s of branchwise at several batch sizes;
- the attention kernels against torch SDPA on the same data (decode over a long context; a causal prefill).
Writes gpu_decode-<device>.json and .png into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import transformers
import triton
from transformers import AutoConfig, AutoModelForCausalLM

from branchwise import kernels
from branchwise.models.fused import fused_weights

SHAPES = {
    "qwen2-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1e6,
    ),
    "qwen2-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1e6,
    ),
    "llama-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=5e5,
    ),
}


def build_checkpoint(shape: str, path: Path) -> Path:
    from branchwise.train.tokenizer import stdlib_files, train_tokenizer

    if (path / "config.json").exists():
        return path
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    # speed does not depend on the tokenizer; ids beyond its vocabulary decode to ""
    train_tokenizer((p.read_text(errors="ignore") for p in stdlib_files(10)), 1024).save_pretrained(path)
    return path


def bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy (read + write), median."""
    x = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms / 1e3)


def model_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def median_rate(fn, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = fn()
        torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def hf_generate_rate(model, prompt: list[int], tokens: int, repeats: int) -> float:
    ids = torch.tensor([prompt], device="cuda")

    def run() -> int:
        out = model.generate(
            ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0
        )
        return out.shape[1] - ids.shape[1]

    run()
    return median_rate(run, repeats)


def kernel_bench(cfg) -> dict:
    """Our paged attention vs torch SDPA (dense, contiguous K/V) on the same data."""
    from branchwise.kernels import triton_attention
    from branchwise.kernels.metadata import build_metadata

    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // Hq
    bs = 16
    results = {}
    for name, batch, ctx, q_len in [
        ("decode b1 ctx4096", 1, 4096, 1),
        ("decode b32 ctx2048", 32, 2048, 1),
        ("verify b16 ctx2048 q5", 16, 2048, 5),
        ("prefill b1 2048", 1, 0, 2048),
    ]:
        total = ctx + q_len
        nblk = -(-total // bs)
        tables = torch.arange(batch * nblk, dtype=torch.int32).view(batch, nblk)
        k_cache = torch.randn(batch * nblk, bs, Hkv, D, dtype=torch.bfloat16, device="cuda")
        v_cache = torch.randn_like(k_cache)
        slots = [int(tables[b, i // bs]) * bs + i % bs for b in range(batch) for i in range(ctx, total)]
        positions = [i for _ in range(batch) for i in range(ctx, total)]
        meta = build_metadata(
            slots, positions, [q_len] * batch, [total] * batch, tables, [None] * batch, bs, "cuda"
        )
        q = torch.randn(batch * q_len, Hq, D, dtype=torch.bfloat16, device="cuda")
        ours = triton.testing.do_bench(
            partial(triton_attention.paged_attention, q, k_cache, v_cache, meta, D**-0.5),
            warmup=25,
            rep=200,
            return_mode="median",
        )
        # SDPA on the same K/V laid out densely (B, H, S, D): what a non-paged engine would read
        k = k_cache.view(batch, nblk * bs, Hkv, D)[:, :total].transpose(1, 2).contiguous()
        v = v_cache.view(batch, nblk * bs, Hkv, D)[:, :total].transpose(1, 2).contiguous()
        qd = q.view(batch, q_len, Hq, D).transpose(1, 2)
        causal = q_len == total
        sdpa = triton.testing.do_bench(
            partial(
                torch.nn.functional.scaled_dot_product_attention, qd, k, v, is_causal=causal, enable_gqa=True
            ),
            warmup=25,
            rep=200,
            return_mode="median",
        )
        kv_bytes = 2 * batch * total * Hkv * D * 2
        results[name] = {
            "branchwise_ms": ours,
            "sdpa_ms": sdpa,
            "kv_bytes": kv_bytes,
            "branchwise_GBps": kv_bytes / ours / 1e6,
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8,32,128")
    ap.add_argument(
        "--skip-compile", action="store_true", help="skip generate + static cache + torch.compile"
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    from branchwise import LLM, SamplingParams

    path = build_checkpoint(args.shape, Path(f"/tmp/branchwise-{args.shape}"))
    cfg = AutoConfig.from_pretrained(path)
    gpu = torch.cuda.get_device_name()
    result = {
        "shape": args.shape,
        "device": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "new_tokens": args.tokens,
        "repeats": args.repeats,
    }
    bw = bandwidth()
    result["bandwidth_GBps"] = bw / 1e9
    print(f"device {gpu}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)

    start = time.perf_counter()
    llm = LLM(
        str(path),
        dtype="bfloat16",
        max_num_seqs=128,
        max_num_batched_tokens=2048,
        max_model_len=4096,
        gpu_memory_utilization=0.5,
    )
    result["engine_start_s"] = time.perf_counter() - start  # load + KV allocation + compile + graph capture
    print(f"engine ready in {result['engine_start_s']:.1f}s", flush=True)
    # which weight shapes start-up tuning gave to the skinny Triton GEMM (the rest stay on cuBLAS)
    result["skinny_gemm"] = {f"{n}x{k}": list(c) for (n, k, _), c in kernels.LINEAR_CONFIGS.items()}
    result["fused_projections"] = bool(fused_weights(llm.engine.model))
    nbytes = model_bytes(llm.engine.model)
    result["model_bytes"] = nbytes
    result["bound_tokens_per_s"] = bw / nbytes
    prompt = list(range(1, 17))
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up

    def ours(batch: int, tokens: int) -> int:
        outs = llm.generate(
            [[i % 1000 + 1 for i in range(b, b + 16)] for b in range(batch)],
            SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
        )
        return sum(len(o.outputs[0].token_ids) for o in outs)

    rates = {"branchwise": median_rate(lambda: ours(1, args.tokens), args.repeats)}
    graphs = llm.engine.runner.graphs
    if graphs is not None and graphs.graphs:  # the GPU time of one batch-1 decode forward, vs the whole step
        replay_ms = triton.testing.do_bench(
            graphs.graphs[graphs.buckets[0]][0].replay, warmup=25, rep=200, return_mode="median"
        )
        result["graph_replay_ms_batch1"] = replay_ms
        result["step_ms_batch1"] = 1e3 / rates["branchwise"]
        print(f"graph replay {replay_ms:.3f} ms vs step {1e3 / rates['branchwise']:.3f} ms", flush=True)
    print(f"branchwise batch-1: {rates['branchwise']:.1f} tok/s (bound {bw / nbytes:.1f})", flush=True)
    # async scheduling against synchronous steps on the same engine, rounds interleaved
    sync_runs, async_runs = [], []
    for _ in range(args.repeats):
        for flag, runs in ((False, sync_runs), (True, async_runs)):
            llm.engine.config.async_scheduling = flag
            runs.append(median_rate(lambda: ours(1, args.tokens), 1))
    llm.engine.config.async_scheduling = False
    rates["branchwise_sync_interleaved"] = statistics.median(sync_runs)
    rates["branchwise_async_scheduling"] = statistics.median(async_runs)
    print(
        f"async scheduling batch-1: {rates['branchwise_async_scheduling']:.1f} tok/s "
        f"vs {rates['branchwise_sync_interleaved']:.1f} synchronous",
        flush=True,
    )
    result["aggregate_tokens_per_s"] = {}
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        result["aggregate_tokens_per_s"][str(b)] = median_rate(lambda b=b: ours(b, 128), args.repeats)
        print(f"branchwise batch {b}: {result['aggregate_tokens_per_s'][str(b)]:.1f} tok/s", flush=True)
    llm.engine.blocks.pools.clear()  # free the KV cache before transformers loads its copy of the model
    llm.engine.runner.pool = llm.engine.runner.graphs = None
    torch.cuda.empty_cache()

    hf = (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
        .cuda()
        .eval()
    )
    rates["hf_generate_eager"] = hf_generate_rate(hf, prompt, args.tokens, args.repeats)
    print(f"transformers generate eager: {rates['hf_generate_eager']:.1f} tok/s", flush=True)
    if not args.skip_compile:
        try:
            # a static cache makes generate compile the forward itself (mode reduce-overhead)
            hf.generation_config.cache_implementation = "static"
            rates["hf_generate_static_compile"] = hf_generate_rate(hf, prompt, args.tokens, args.repeats)
            print(
                f"transformers generate static+compile: {rates['hf_generate_static_compile']:.1f} tok/s",
                flush=True,
            )
        except Exception as e:  # report, do not hide: the row is then missing from the table
            result["hf_generate_static_compile_error"] = f"{type(e).__name__}: {e}"[:500]
            print("static+compile failed:", result["hf_generate_static_compile_error"], flush=True)
    del hf
    torch.cuda.empty_cache()
    result["batch1_tokens_per_s"] = rates
    result["batch1_fraction_of_bound"] = rates["branchwise"] / (bw / nbytes)
    result["kernels"] = kernel_bench(cfg)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = gpu.replace(" ", "_")
    (out / f"gpu_decode-{tag}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"gpu_decode-{tag}.png")
    print(json.dumps(result, indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rates = result["batch1_tokens_per_s"]
    names = list(rates) + ["bandwidth bound"]
    values = list(rates.values()) + [result["bound_tokens_per_s"]]
    axes[0].bar(names, values, color=["C0", "C1", "C2", "grey"][: len(names)])
    axes[0].set_title(f"batch-1 decode, {result['shape']} (tok/s)")
    axes[0].tick_params(axis="x", rotation=20)
    agg = result["aggregate_tokens_per_s"]
    axes[1].plot([int(b) for b in agg], list(agg.values()), marker="o")
    axes[1].set_xscale("log", base=2)
    axes[1].set_title("branchwise aggregate decode (tok/s)")
    axes[1].set_xlabel("concurrent requests")
    k = result["kernels"]
    x = range(len(k))
    axes[2].bar(
        [i - 0.2 for i in x], [v["branchwise_ms"] for v in k.values()], 0.4, label="branchwise (paged)"
    )
    axes[2].bar([i + 0.2 for i in x], [v["sdpa_ms"] for v in k.values()], 0.4, label="torch SDPA (dense)")
    axes[2].set_xticks(list(x), list(k), rotation=20, fontsize=7)
    axes[2].set_title("attention kernels (ms)")
    axes[2].legend()
    fig.suptitle(f"{result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
