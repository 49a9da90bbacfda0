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


def load_records(dataset: str) -> list[dict]:
    """Records ({"prompt", optional "messages", "schema", "answer", ...}) of a named set or a JSONL file."""
    path = Path(dataset)
    if not path.exists():
        path = DATA_DIR / f"{dataset}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no dataset {dataset!r} (neither a file nor {path})")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_prompts(dataset: str | None, n: int) -> list[str]:
    if dataset in (None, "code"):
        return code_prompts(n)
    records = load_records(dataset)
    return [r["prompt"] for r in (records * (n // max(len(records), 1) + 1))[:n]]
