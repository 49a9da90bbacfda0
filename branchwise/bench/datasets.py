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


TOOLS = {
    "get_weather": {"city": {"type": "string"}},
    "convert_units": {
        "value": {"type": "number"},
        "from_unit": {"type": "string"},
        "to_unit": {"type": "string"},
    },
    "calculator": {"expression": {"type": "string"}},
}
CITIES = ["Paris", "Lima", "Osaka", "Cairo", "Oslo", "Quito", "Perth", "Dakar"]


def _tool_call(rng) -> tuple[str, str, dict, str]:
    """(user ask, tool name, arguments, tool result) of one made-up tool use."""
    name = rng.choice(list(TOOLS))
    if name == "get_weather":
        city = rng.choice(CITIES)
        args, ask = {"city": city}, f"What is the weather in {city}?"
        result = {"city": city, "temperature_c": rng.randint(-5, 35), "sky": rng.choice(["clear", "rain"])}
    elif name == "convert_units":
        value, (a, b) = rng.randint(1, 500), rng.choice([("km", "mi"), ("kg", "lb"), ("c", "f")])
        args, ask = {"value": value, "from_unit": a, "to_unit": b}, f"Convert {value} {a} to {b}."
        result = {"value": round(value * 0.62, 2), "unit": b}
    else:
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        args, ask = {"expression": f"{x}*{y}"}, f"Use the calculator for {x} times {y}."
        result = {"result": x * y}
    return ask, name, args, json.dumps(result)


def _trace(paths: list[tuple[str, str]], conclusion: str, answer: int) -> str:
    """The demo model's Multiverse answer to an arithmetic task, as text."""
    outlines = "".join(f"<Outline>{o}</Outline>\n" for o, _ in paths)
    body = "".join(f"<Path>{p}</Path>" for _, p in paths)
    return (
        f"<Parallel>\n<Goal>\n{outlines}</Goal>{body}<Conclusion>{conclusion}</Conclusion>\n</Parallel>\n"
        f"The answer is {answer}."
    )


def agent_records(n: int, seed: int) -> list[dict]:
    """Agent-like sessions that repeat themselves: earlier turns whose answers share the final answer's
    shape (JSON records, tool calls against the same tools, worked traces), the tool list on every
    request; the final turn's answer is constrained by a schema where it is JSON."""
    import random

    from branchwise.train.demo_data import arithmetic, extraction
    from branchwise.train.eval import schema_of

    rng = random.Random(seed)
    tools = [
        {"type": "function", "function": {"name": k, "parameters": {"type": "object", "properties": v}}}
        for k, v in TOOLS.items()
    ]
    records = []
    for i in range(n):
        messages: list[dict] = []
        record: dict = {}
        if i % 3 == 0:  # an extraction session
            for _ in range(rng.randint(2, 4)):
                message, answer, _ = extraction(rng)
                messages += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
            message, answer, fields = extraction(rng)
            record = {"schema": schema_of(fields), "answer": answer}
        elif i % 3 == 1:  # a tool session: calls, results, answers; then the next call
            for k in range(rng.randint(2, 3)):
                ask, name, args, result = _tool_call(rng)
                call = {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": args}}
                messages += [
                    {"role": "user", "content": ask},
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": f"call_{k}", "content": result},
                    {"role": "assistant", "content": f"Done: {result}"},
                ]
            message = _tool_call(rng)[0]
            names = {"enum": list(TOOLS)}
            record = {
                "tools": tools,
                "schema": {
                    "type": "object",
                    "properties": {"name": names, "arguments": {"type": "object"}},
                    "required": ["name", "arguments"],
                },
            }
        else:  # an arithmetic session with earlier worked traces
            for _ in range(2):
                message, paths, conclusion, answer = arithmetic(rng)
                messages += [
                    {"role": "user", "content": message},
                    {"role": "assistant", "content": _trace(paths, conclusion, answer)},
                ]
            message, _, _, answer = arithmetic(rng)
            record = {"answer": answer}
        messages.append({"role": "user", "content": message})
        records.append({"messages": messages} | record)
    return records


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
    sets["agent"] = agent_records(n, seed)
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
