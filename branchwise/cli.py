"""`branchwise generate | serve | bench | train`."""

from __future__ import annotations

import argparse
import logging
import sys

from branchwise.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (`--max-num-seqs`, ...); unset flags keep the config's value."""
    for name, field in EngineConfig.model_fields.items():
        if name == "model":
            continue
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        typ = int if kind in (int, int | None) else float if kind in (float, float | None) else str
        parser.add_argument(flag, dest=name, type=typ, default=None, help=field.description)


def engine_config(args: argparse.Namespace, base: dict | None = None) -> EngineConfig:
    values = dict(base or {})
    values.update({k: v for k, v in vars(args).items() if k in EngineConfig.model_fields and v is not None})
    return EngineConfig(**values)


def cmd_generate(args: argparse.Namespace) -> None:
    from branchwise import LLM, SamplingParams

    config = engine_config(args)
    llm = LLM(**config.model_dump())
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed_sampling)
    for update in llm.stream(prompt, params):
        sys.stdout.write(update.text)
        sys.stdout.flush()
        if update.error:
            sys.exit(f"\nerror: {update.error}")
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="branchwise", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, streaming to the terminal")
    gen.add_argument("model", nargs="?", default="demo", help="checkpoint folder or hub id (default: demo)")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--seed-sampling", type=int, default=None, help="sampling seed of this request")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
