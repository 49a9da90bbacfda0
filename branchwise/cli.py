"""`branchwise generate | serve | bench | train`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pydantic import BaseModel, ValidationError

from branchwise.config import EngineConfig, ServerConfig, load_yaml


def add_config_args(parser: argparse.ArgumentParser, config: type[BaseModel]) -> None:
    """One flag per config field (`--max-num-seqs`, ...); unset flags keep the file's or default value."""
    for name, field in config.model_fields.items():
        if name == "model":
            continue
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        text = field.description or name.replace("_", " ")
        if name == "strategy":
            from branchwise.strategies import registry

            text = f"default decoding strategy, requests may override it: {', '.join(sorted(registry()))}"
        shown = "none" if field.default is None else field.default
        text = f"{text} (default: {shown})".replace("%", "%%")
        if kind in (bool, bool | None):
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
            continue
        typ = int if kind in (int, int | None) else float if kind in (float, float | None) else str
        flags = [flag, "-tp"] if name == "tensor_parallel_size" else [flag]  # vLLM's and SGLang's short flag
        parser.add_argument(*flags, dest=name, type=typ, default=None, help=text)


def check_model(name: str) -> None:
    """A model that is neither the demo, a local folder nor a hub id (`org/name`) fails here, before any
    weights load."""
    from pathlib import Path

    if name == "demo" or Path(name).exists():
        return
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ValueError(f"model {name!r} is neither a local folder nor a hub id (org/name)")


def build_config(args: argparse.Namespace, config: type[BaseModel], base: dict | None = None):
    """The validated config: file values, overridden by the flags given; exits with a clear message."""
    values = dict(base or {})
    values.update({k: v for k, v in vars(args).items() if k in config.model_fields and v is not None})
    try:
        return config(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            flag = "--" + ".".join(str(x) for x in err["loc"]).replace("_", "-")
            problems.append(f"{flag}: {err['msg'].removeprefix('Value error, ')}")
        sys.exit("error: invalid configuration: " + "; ".join(problems))


def cmd_generate(args: argparse.Namespace) -> None:
    from branchwise import LLM, SamplingParams

    config = build_config(args, EngineConfig)
    check_model(config.model)
    llm = LLM(**config.model_dump())
    chat = llm.tokenizer.chat_template and not args.raw
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if chat else args.prompt
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed_sampling)
    for update in llm.stream(prompt, params):
        sys.stdout.write(update.text)
        sys.stdout.flush()
        if update.error:
            sys.exit(f"\nerror: {update.error}")
    sys.stdout.write("\n")


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from branchwise.server.app import create_app
    from branchwise.server.guard import uvicorn_config

    base = {}
    if args.config:
        try:
            base = load_yaml(args.config)
        except (OSError, ValueError) as e:
            sys.exit(f"cannot read {args.config}: {e}")
    if args.model is not None:
        base["model"] = args.model
    config = build_config(args, ServerConfig, base)
    check_model(config.model)
    if config.log_level == "debug":
        quiet(False)
    app = create_app(config)
    uvicorn.Server(uvicorn_config(app, config)).run()


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    from branchwise.bench.datasets import load_prompts
    from branchwise.bench.online import launched

    prompts = load_prompts(args.dataset, args.num_prompts)
    # the clients' base_url works too
    base_url = args.base_url or ("" if args.launch else "http://127.0.0.1:8000")
    urls = [u.strip().rstrip("/").removesuffix("/v1") for u in base_url.split(",") if u.strip()]
    out = Path(args.out or f"bench-results/{time_tag()}/serve.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with launched(args.launch or [], out.parent) as started:
        run_bench_serve(args, prompts, urls + started, out)


def run_bench_serve(args: argparse.Namespace, prompts: list[str], urls: list[str], out) -> None:
    from branchwise.bench.online import bench_compare, bench_serve, format_compare, format_table

    if len(urls) > 1:
        concurrency = [int(c) for c in args.concurrency.split(",")]
        result = bench_compare(
            urls,
            prompts,
            concurrency,
            args.max_tokens,
            args.rounds,
            args.request_rate,
            args.model,
            args.api_key,
            args.seed,
        )
        print(format_compare(result))
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
        return
    base_url = urls[0]
    result = bench_serve(
        base_url,
        prompts,
        [int(c) for c in args.concurrency.split(",")],
        args.max_tokens,
        args.request_rate,
        args.model,
        args.api_key,
        args.seed,
    )
    print(format_table(result))
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def cmd_bench_offline(args: argparse.Namespace) -> None:
    from branchwise.bench.offline import bench_offline, format_table

    result = bench_offline(
        args.model,
        tuple(args.strategies.split(",")),
        tuple(int(b) for b in args.batch_sizes.split(",")),
        args.dataset,
        args.max_tokens,
        args.draft_model,
        args.device,
        not args.no_baselines,
        args.out,
        args.repeats,
        args.min_tokens,
    )
    print(format_table(result))
    print("wrote " + " and ".join(result[k] for k in ("json_path", "png_path") if k in result))


def cmd_train_demo(args: argparse.Namespace) -> None:
    from pathlib import Path

    from branchwise.models.demo import ASSET_DIR
    from branchwise.train.demo import train_demo

    init = Path(args.init) if args.init else None
    out = Path(args.out or ASSET_DIR)
    info = train_demo(out, args.minutes, args.device, args.seed, examples=args.examples, init=init)
    print(json.dumps(info, indent=2))


def cmd_train_drafter(args: argparse.Namespace) -> None:
    """`train mtp`, `train medusa`, `train eagle3`: self-distillation from the model's own completions."""
    from pathlib import Path

    from branchwise.models.demo import resolve

    if args.train == "mtp":
        from branchwise.train.mtp import train_mtp as trainer

        extra = {}
    elif args.train == "medusa":
        from branchwise.train.medusa import train_medusa as trainer

        extra = {"num_heads": args.num_heads, "num_layers": args.num_layers}
    else:
        from branchwise.train.eagle3 import train_eagle3 as trainer

        extra = {"draft_vocab_size": args.draft_vocab_size}
    info = trainer(
        resolve(args.model),
        Path(args.out) if args.out else None,
        args.minutes,
        args.device,
        args.seed,
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        data=args.data,
        init=args.init,
        **extra,
    )
    print(json.dumps(info, indent=2))


def cmd_eval_demo(args: argparse.Namespace) -> None:
    from branchwise.models.demo import resolve
    from branchwise.train.eval import eval_demo

    print(json.dumps(eval_demo(resolve(args.model), args.tasks, args.device, args.strategy), indent=2))


def time_tag() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")


def add_self_distillation_args(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The flags of every trainer that learns from a frozen model's own completions."""
    parser.add_argument("--model", default="demo")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget, generation included")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prompts", type=int, default=2000, help="prompts the model completes")
    parser.add_argument("--max-tokens", type=int, default=160, help="tokens the model writes per prompt")
    parser.add_argument(
        "--data", default=None, help="JSONL prompts ({prompt} or {messages}); default: demo tasks"
    )
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument(
        "--init",
        default=None,
        help="continue from these weights (e.g. the module of the model's last version)",
    )


def quiet(on: bool = True) -> None:
    """transformers' per-weight loading bars and notices: off unless asked for (--log-level debug)."""
    import transformers

    if on:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:
        transformers.utils.logging.set_verbosity_info()
        transformers.utils.logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="branchwise", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, streaming to the terminal")
    gen.add_argument("model", nargs="?", default="demo", help="checkpoint folder or hub id (default: demo)")
    gen.add_argument("prompt")
    gen.add_argument(
        "--raw", action="store_true", help="send the prompt as it is, not in the model's chat template"
    )
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0.0)")
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to write (default: 128)")
    gen.add_argument("--seed-sampling", type=int, default=None, help="sampling seed of this request")
    add_config_args(gen, EngineConfig)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None, help="checkpoint folder or hub id (default: demo)")
    serve.add_argument("--config", help="YAML file of settings (flags override it)")
    add_config_args(serve, ServerConfig)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    online = bench.add_parser("serve", help="load an OpenAI-compatible server (ours or any other)")
    online.add_argument(
        "--base-url",
        default=None,
        help="a server, or several comma-separated: the same load on each in alternated --rounds "
        "(default: http://127.0.0.1:8000, unless --launch starts the servers)",
    )
    online.add_argument(
        "--launch",
        action="append",
        metavar="CMD",
        help="start a server for the run (repeatable; after any --base-url servers): a command with "
        "{port}, e.g. 'branchwise serve --port {port}' and 'transformers serve --continuous-batching "
        "--port {port}'; stopped when the run ends, its output in server-<i>.log beside --out",
    )
    online.add_argument("--rounds", type=int, default=3, help="rounds per server when comparing servers")
    online.add_argument("--model", default=None, help="model name to send (default: the server's first)")
    online.add_argument("--concurrency", default="1,16,64", help="comma-separated fixed concurrency levels")
    online.add_argument(
        "--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second"
    )
    online.add_argument("--num-prompts", type=int, default=64)
    online.add_argument("--max-tokens", type=int, default=128)
    online.add_argument("--dataset", default=None, help="a name under benchmarks/data/ or a JSONL file")
    online.add_argument("--api-key", default=None)
    online.add_argument("--seed", type=int, default=0)
    online.add_argument("--out", default=None, help="JSON file (default: bench-results/<time>/serve.json)")
    online.set_defaults(func=cmd_bench_serve)

    offline = bench.add_parser("offline", help="every strategy and the transformers baselines, in-process")
    offline.add_argument("--model", default="demo", help="checkpoint folder or hub id")
    offline.add_argument(
        "--draft-model", default=None, help="draft checkpoint (default: draft/ beside the model)"
    )
    offline.add_argument(
        "--strategies",
        default="ar,draft,ngram,suffix,mtp,medusa,multiverse",
        help="comma-separated; those the model lacks weights for are skipped; `ar-async` is `ar` with "
        "async scheduling",
    )
    offline.add_argument("--batch-sizes", default="1,8,32", help="comma-separated")
    offline.add_argument(
        "--dataset", default="chat", help="code|extraction|arithmetic|chat|agent or a JSONL file"
    )
    offline.add_argument("--max-tokens", type=int, default=128, help="most output tokens a request")
    offline.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    offline.add_argument("--no-baselines", action="store_true", help="skip the transformers baselines")
    offline.add_argument(
        "--out", default=None, help="JSON file or folder (default: a new bench-results/<time>/ here)"
    )
    offline.add_argument("--repeats", type=int, default=3, help="interleaved rounds after the warm-up")
    offline.add_argument("--min-tokens", type=int, default=2048, help="output tokens each cell measures")
    offline.set_defaults(func=cmd_bench_offline)

    train = sub.add_parser("train", help="training").add_subparsers(dest="train", required=True)
    demo = train.add_parser("demo", help="train the embedded demo model and its draft model from scratch")
    demo.add_argument("--minutes", type=float, default=55.0, help="wall-clock budget for both models")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--examples",
        type=int,
        default=None,
        help="examples generated (default 600,000 on GPU, 60,000 on CPU)",
    )
    demo.add_argument("--out", default=None, help="output folder (default: branchwise/assets/demo)")
    demo.add_argument(
        "--init", default=None, help="continue training a demo checkpoint (e.g. the shipped one)"
    )
    demo.set_defaults(func=cmd_train_demo)
    mtp = train.add_parser("mtp", help="self-distil an MTP module for a frozen model")
    add_self_distillation_args(mtp, "output file (default: mtp.safetensors beside the model)")
    mtp.set_defaults(func=cmd_train_drafter)
    eagle3 = train.add_parser("eagle3", help="self-distil an EAGLE-3 drafter for a frozen model")
    add_self_distillation_args(eagle3, "output folder (default: eagle3/ beside the model)")
    eagle3.add_argument(
        "--draft-vocab-size", type=int, default=None, help="draft vocabulary (default: the model's)"
    )
    eagle3.set_defaults(func=cmd_train_drafter)
    medusa = train.add_parser("medusa", help="self-distil Medusa heads for a frozen model")
    add_self_distillation_args(medusa, "output folder (default: medusa/ beside the model)")
    medusa.add_argument("--num-heads", type=int, default=4)
    medusa.add_argument("--num-layers", type=int, default=1, help="residual blocks per head")
    medusa.set_defaults(func=cmd_train_drafter)
    ev = train.add_parser("eval-demo", help="accuracy of the demo model on held-out tasks")
    ev.add_argument("--model", default="demo")
    ev.add_argument("--tasks", type=int, default=200)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--strategy", default=None)
    ev.set_defaults(func=cmd_eval_demo)

    for p in (online, offline, demo, mtp, medusa, ev):
        p.formatter_class = formatter
    args = parser.parse_args(argv)
    quiet()
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # a bad model, flag or file: one line, no traceback
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"error: {message}")


if __name__ == "__main__":
    main()
