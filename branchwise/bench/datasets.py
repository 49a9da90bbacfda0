"""Prompt sets for the benchmarks: shipped JSONL files under benchmarks/data/, or a user's own JSONL."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from branchwise.train.tokenizer import stdlib_files

DATA_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


def code_prompts(n: int) -> list[str]:
    """Code completion: a stdlib function's signature and docstring, to be continued."""
    prompts = []
    for path in stdlib_files():
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except SyntaxError:
            continue
        lines = path.read_text(errors="ignore").splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.body and len(prompts) < n:
                first = node.body[0]
                prompts.append("\n".join(lines[node.lineno - 1 : first.end_lineno]) + "\n")
        if len(prompts) >= n:
            break
    return prompts


def write_datasets(n: int = 64, seed: int = 2026) -> None:
    """The shipped prompt sets (`python -m branchwise.bench.datasets` regenerates them)."""
    import random

    from branchwise.train.demo_data import arithmetic, extraction
    from branchwise.train.eval import schema_of

    rng = random.Random(seed)
    sets: dict[str, list[dict]] = {"code": [{"prompt": p} for p in code_prompts(n)]}
    sets["extraction"] = []
    for _ in range(n):
        message, answer, fields = extraction(rng)
        sets["extraction"].append(
            {
                "messages": [{"role": "user", "content": message}],
                "schema": schema_of(fields),
                "answer": answer,
            }
        )
    sets["arithmetic"] = []
    for _ in range(n):
        message, _, _, answer = arithmetic(rng)
        sets["arithmetic"].append({"messages": [{"role": "user", "content": message}], "answer": answer})
    sets["chat"] = [
        {"messages": [{"role": "user", "content": r["messages"][0]["content"]}]}
        for pair in zip(sets["extraction"], sets["arithmetic"], strict=True)
        for r in pair
    ][:n]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name, records in sets.items():
        (DATA_DIR / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def load_records(dataset: str) -> list[dict]:
    """Records ({"prompt", optional "messages", "schema", "answer", ...}) of a named set or a JSONL file."""
    path = Path(dataset)
    if not path.exists():
        path = DATA_DIR / f"{dataset}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no dataset {dataset!r} (neither a file nor {path})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_prompts(dataset: str | None, n: int) -> list[str]:
    """Plain-text prompts (records with `messages` give their last user message)."""
    records = load_records(dataset or "code")
    records = (records * (n // max(len(records), 1) + 1))[:n]
    return [r["prompt"] if "prompt" in r else r["messages"][-1]["content"] for r in records]


if __name__ == "__main__":
    write_datasets()
