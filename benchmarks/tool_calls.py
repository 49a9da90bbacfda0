"""Tool calls under every strategy: how many are valid, whether they equal `ar`'s, and what the call grammar
costs in tokens/s against an unconstrained completion of the same length.

    python benchmarks/tool_calls.py [--model demo] [--prompts 8] [--repeats 3]

Each prompt asks for one call (`tool_choice: "required"`, `parallel_tool_calls: false`) among two tools
(strict schemas: no extra properties), greedy, through `LLM.chat` (what the server does). Then, per
strategy, the same prompts run again constrained and unconstrained (`ignore_eos`, max_tokens = the
constrained output's length), alternated, `--repeats` times; the table gives median tokens/s (min-max).
Results: benchmarks/results/tool_calls-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import jsonschema

from branchwise import LLM, SamplingParams
from branchwise.train.demo_data import arithmetic

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "maxLength": 40}},
                "required": ["expression"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
STRATEGIES = ("ar", "draft", "ngram", "mtp", "medusa")


def valid(calls: list[dict] | None) -> bool:
    if not calls:
        return False
    for c in calls:
        try:
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
        except (json.JSONDecodeError, jsonschema.ValidationError, KeyError):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(args.model)
    rng = random.Random(7)
    chats = [[{"role": "user", "content": arithmetic(rng)[0]}] for _ in range(args.prompts)]
    params = SamplingParams(temperature=0, max_tokens=128)

    def call(chat, strategy):
        return llm.chat(chat, params, TOOLS, "required", parallel_tool_calls=False, strategy=strategy)

    result: dict = {"model": args.model, "prompts": args.prompts, "repeats": args.repeats, "strategies": {}}
    reference = [call(c, "ar").outputs[0] for c in chats]
    for strategy in STRATEGIES:
        outs = [call(c, strategy).outputs[0] for c in chats]
        rates: dict[str, list[float]] = {"constrained": [], "unconstrained": []}
        for _ in range(args.repeats):
            for mode in rates:
                started, tokens = time.perf_counter(), 0
                for chat, ref in zip(chats, reference, strict=True):
                    if mode == "constrained":
                        tokens += len(call(chat, strategy).outputs[0].token_ids)
                    else:
                        n = len(ref.token_ids)
                        same = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                        tokens += len(llm.chat(chat, same, strategy=strategy).outputs[0].token_ids)
                rates[mode].append(tokens / (time.perf_counter() - started))
        result["strategies"][strategy] = {
            "valid_calls": sum(valid(o.tool_calls) for o in outs),
            "equal_to_ar": sum(o.token_ids == r.token_ids for o, r in zip(outs, reference, strict=True)),
            "tok_s": {
                m: {"p50": statistics.median(v), "min": min(v), "max": max(v)} for m, v in rates.items()
            },
        }
    print(f"{'strategy':<8} {'valid':>6} {'=ar':>4}  constrained tok/s (min-max)   unconstrained (min-max)")
    for strategy, r in result["strategies"].items():
        c, u = r["tok_s"]["constrained"], r["tok_s"]["unconstrained"]
        print(
            f"{strategy:<8} {r['valid_calls']:>3}/{args.prompts:<2} {r['equal_to_ar']:>3}  "
            f"{c['p50']:7.1f} ({c['min']:.1f}-{c['max']:.1f})          "
            f"{u['p50']:7.1f} ({u['min']:.1f}-{u['max']:.1f})"
        )
    out = Path(__file__).parent / "results" / "tool_calls-cpu.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
