"""Mean accepted length (tokens per drafting step) of every drafter of one or more demo-like checkpoints,
at fixed settings on the same held-out chat prompts, each checked against `ar`'s tokens.

    python benchmarks/drafter_acceptance.py OLD_DEMO_DIR NEW_DEMO_DIR [--out results.json]

Fixed settings (no adaptive K), so the figures do not move with the machine's load: a before/after table
for retrained weights (the demo model card's).
"""

from __future__ import annotations

import argparse
import json

from branchwise import LLM, SamplingParams
from branchwise.bench.datasets import load_records

SETTINGS = [
    ("draft", {"num_speculative_tokens": 4}),
    ("mtp", {"num_speculative_tokens": 1}),
    ("mtp", {"num_speculative_tokens": 3}),
    ("medusa", None),
    ("eagle3", {"num_speculative_tokens": 1}),
    ("eagle3", {"num_speculative_tokens": 3}),
    ("eagle3", {"topk": 3, "num_draft_tokens": 12, "num_speculative_tokens": 3}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {}
    for path in args.models:
        llm = LLM(path, max_num_seqs=64)
        prompts = [llm.chat_prompt(r["messages"]) for r in load_records("chat")[: args.prompts]]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        ar = [o.outputs[0].token_ids for o in llm.generate(prompts, params, "ar")]
        row = {}
        for strategy, settings in SETTINGS:
            outs = [o.outputs[0] for o in llm.generate(prompts, params, strategy, settings)]
            if [o.token_ids for o in outs] != ar:
                raise SystemExit(f"{path}: {strategy} {settings} did not give ar's tokens")
            steps = sum(o.num_draft_steps for o in outs)
            row[f"{strategy} {json.dumps(settings) if settings else 'default'}"] = round(
                1 + sum(o.num_accepted for o in outs) / steps, 3
            )
        result[path] = row
        print(path, json.dumps(row, indent=1), flush=True)
        del llm
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
