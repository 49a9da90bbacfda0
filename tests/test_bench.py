"""`branchwise bench offline` and `bench serve` on the tiny model, and the CLI's one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_server import running_server

from branchwise.bench.offline import bench_offline, format_table
from branchwise.bench.online import bench_serve
from branchwise.cli import main


def test_offline_bench_reports_every_figure_with_its_spread(tiny_llama, tmp_path):
    out = tmp_path / "offline.json"
    result = bench_offline(
        tiny_llama,
        ("ar", "ar-async", "ngram", "draft"),
        (1, 3),
        "extraction",
        8,
        device="cpu",
        out=str(out),
        repeats=2,
        min_tokens=40,
    )
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    # no draft model: skipped, said so; `ar-async` is `ar` with async scheduling, on for its rows only
    assert {r["strategy"] for r in saved["rows"]} == {"ar", "ar-async", "ngram"}
    assert not saved["config"]["async_scheduling"]
    assert {(r["batch"], r["constrained"]) for r in saved["rows"]} == {
        (1, False),
        (1, True),
        (3, False),
        (3, True),
    }
    for r in saved["rows"]:
        assert r["errors"] == 0 and r["requests"] % max(r["batch"], 4) == 0
        assert r["output_tokens"] >= 40  # enough passes over the prompts for min_tokens
        spread = r["tokens_per_s_spread"]
        assert spread["min"] <= r["tokens_per_s"] == spread["p50"] <= spread["max"]
        assert r["latency_s"]["p99"] >= r["latency_s"]["p50"] > 0 and 0 < r["ttft_s"]["p50"]
        assert r["speedup_vs_ar"] > 0 and r["speedup_vs_generate"] > 0
        ar = next(
            x
            for x in saved["rows"]
            if (x["batch"], x["strategy"], x["constrained"]) == (r["batch"], "ar", r["constrained"])
        )
        paired = sorted(x / y for x, y in zip(r["rounds"], ar["rounds"], strict=True))
        assert len(paired) == 2 and r["speedup_vs_ar_paired"] == pytest.approx(sum(paired) / 2)
        assert r["same_tokens_as_ar"]  # lossless: ngram's tokens are ar's, and so are ar-async's
        if r["constrained"]:
            assert r["forced_tokens"] > 0
        assert (r["deferred_tokens"] > 0) == (r["strategy"] == "ar-async" and not r["constrained"])
    assert {"hf_generate", "hf_prompt_lookup"} <= set(saved["baselines"])
    assert all(b["tokens_per_s"] > 0 for b in saved["baselines"].values())
    table = format_table(result)
    assert "baseline hf_generate" in table and "2 interleaved rounds" in table


def test_offline_bench_without_matplotlib_says_so_first_and_writes_outside_the_repo(tiny_llama, tmp_path):
    args = ["bench", "offline", "--model", tiny_llama, "--strategies", "ar,ngram", "--batch-sizes", "1"]
    args += ["--max-tokens", "8", "--no-baselines", "--repeats", "1", "--min-tokens", "8", "--device", "cpu"]
    code = f"import sys; sys.modules['matplotlib'] = None; from branchwise.cli import main; main({args!r})"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.index("matplotlib is not installed") < run.stdout.index("tok/s p50")
    written = list(tmp_path.glob("bench-results/*/bench_offline-*.json"))
    assert len(written) == 1 and not list(tmp_path.glob("bench-results/*/*.png"))


def test_online_bench_counts_the_tokens_the_server_returned(tiny_llama, tmp_path, capsys):
    with running_server(model=tiny_llama, max_num_seqs=8) as (url, _):
        prompts = ["def add(a, b):", "import os", "class A:", "x = 1", "for i in range(3):", "# a comment"]
        result = bench_serve(url, prompts, [1, 4], 12, progress=False)
        out = tmp_path / "serve.json"  # the base_url clients use, with /v1, works too
        main(
            ["bench", "serve", "--base-url", url + "/v1", "--num-prompts", "2", "--concurrency", "1"]
            + ["--max-tokens", "4", "--out", str(out)]
        )
        assert json.loads(out.read_text())["levels"][0]["completed"] == 2
    for level in result["levels"]:
        assert level["completed"] == 6 and level["failed"] == 0
        assert level["output_tokens"] == 6 * 12  # ignore_eos: every request returns max_tokens
        assert level["output_throughput"] > 0 and level["ttft_s"]["p50"] > 0


def test_cli_mistakes_are_one_line_errors_before_any_weights_load():
    for args in (
        ["serve", "no/such/folder"],
        ["serve", "--strategy", "foo"],
        ["generate", "--dtype", "int3", "x"],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "branchwise.cli", *args], capture_output=True, text=True, timeout=120
        )
        lines = run.stderr.strip().splitlines()
        assert run.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
        assert "Traceback" not in run.stderr


def test_bench_serve_compares_with_transformers_serve_in_alternated_rounds(tiny_llama, tmp_path, monkeypatch):
    """One command starts ours and `transformers serve --continuous-batching` on free ports, loads both
    alike and stops both: theirs refuses `ignore_eos` (422), so neither gets it, and its tokens are its
    streamed chunks (it sends no usage)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bin_dir = Path(sys.executable).parent
    ours = f"{bin_dir / 'branchwise'} serve {tiny_llama} --max-num-seqs 8 --log-level warning --port {{port}}"
    theirs = f"{bin_dir / 'transformers'} serve --continuous-batching --device cpu --port {{port}} "
    theirs += tiny_llama
    out = tmp_path / "compare.json"
    main(
        ["bench", "serve", "--launch", ours, "--launch", theirs, "--rounds", "2", "--concurrency", "1,2"]
        + ["--num-prompts", "3", "--max-tokens", "6", "--out", str(out)]
    )
    logs = sorted(p.name for p in tmp_path.glob("server-*.log"))
    assert logs == ["server-0.log", "server-1.log"]
    for port in (json.loads(out.read_text())["servers"][i]["base_url"] for i in (0, 1)):
        with pytest.raises(httpx.HTTPError):  # both stopped with the run
            httpx.get(port + "/v1/models", timeout=2)
    result = json.loads(out.read_text())
    ours_, theirs_ = result["servers"]
    assert not result["ignore_eos"]
    for server in (ours_, theirs_):
        assert [lv["concurrency"] for lv in server["levels"]] == [1, 2]
        for level in server["levels"]:
            assert level["failed"] == 0 and len(level["rounds"]) == 2 and level["output_throughput"] > 0
            assert 0 < level["mean_output_tokens"] <= 6
    # greedy, the same weights: the same tokens from both servers
    for a, b in zip(ours_["levels"], theirs_["levels"], strict=True):
        assert a["mean_output_tokens"] == b["mean_output_tokens"]
    assert all(lv["ratio_to_first"] == 1 for lv in ours_["levels"])
