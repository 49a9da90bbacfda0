"""`branchwise bench offline` and `bench serve` smoke runs on the tiny model: every figure present, sane."""

from __future__ import annotations

import json

from test_server import running_server

from branchwise.bench.offline import bench_offline, format_table
from branchwise.bench.online import bench_serve


def test_offline_bench_reports_every_figure_and_writes_json_and_png(tiny_llama, tmp_path):
    out = tmp_path / "offline.json"
    result = bench_offline(
        tiny_llama, ("ar", "ngram", "draft"), (1, 3), "extraction", 8, device="cpu", out=str(out)
    )
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    assert {r["strategy"] for r in saved["rows"]} == {"ar", "ngram"}  # no draft model: skipped, said so
    assert {(r["batch"], r["constrained"]) for r in saved["rows"]} == {
        (1, False),
        (1, True),
        (3, False),
        (3, True),
    }
    for r in saved["rows"]:
        assert r["errors"] == 0 and r["requests"] == max(r["batch"], 4)
        assert 0 < r["output_tokens"] <= 8 * r["requests"]
        assert r["tokens_per_s"] > 0 and r["latency_s"]["p99"] >= r["latency_s"]["p50"] > 0
        assert 0 < r["ttft_s"]["p50"] <= r["latency_s"]["p99"]
        assert r["speedup_vs_ar"] > 0 and r["speedup_vs_generate"] > 0
        if r["constrained"]:
            assert r["forced_tokens"] > 0
    assert {"hf_generate", "hf_prompt_lookup"} <= set(saved["baselines"])
    assert all(b["tokens_per_s"] > 0 for b in saved["baselines"].values())
    assert "baseline hf_generate" in format_table(result)


def test_online_bench_counts_the_tokens_the_server_returned(tiny_llama):
    with running_server(model=tiny_llama, max_num_seqs=8) as (url, _):
        prompts = ["def add(a, b):", "import os", "class A:", "x = 1", "for i in range(3):", "# a comment"]
        result = bench_serve(url, prompts, [1, 4], 12, progress=False)
    for level in result["levels"]:
        assert level["completed"] == 6 and level["failed"] == 0
        assert level["output_tokens"] == 6 * 12  # ignore_eos: every request returns max_tokens
        assert level["output_throughput"] > 0 and level["ttft_s"]["p50"] > 0
