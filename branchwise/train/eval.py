"""`branchwise train eval-demo`: the demo model on held-out synthetic tasks and held-out stdlib code."""

from __future__ import annotations

import json
import math
import random
import re

import torch
from transformers import AutoModelForCausalLM

from branchwise import LLM, SamplingParams
from branchwise.constraints import Constraint
from branchwise.train.demo import held_out
from branchwise.train.demo_data import (
    EVAL_SYSTEM_PROMPTS,
    TOOLS,
    arithmetic,
    extraction,
    run_tool,
    tool_task,
    trace_text,
)
from branchwise.train.tokenizer import stdlib_files

EVAL_SEED = 987_654_321  # a stream the training seeds never produce
CODE_WINDOW = 384  # tokens per perplexity window (the v1 training length: figures stay comparable)


def well_formed(text: str, parts: int) -> bool:
    """The Multiverse structure: a goal with one outline per part, as many paths, a conclusion, an answer."""
    pattern = (
        rf"<Parallel>\n<Goal>\n(?:<Outline>[^<]*</Outline>\n){{{parts}}}</Goal>(?:<Path>[^<]*</Path>){{{parts}}}"
        r"<Conclusion>[^<]*</Conclusion>\n</Parallel>\nThe answer is -?\d+\.\s*$"
    )
    return re.match(pattern, text) is not None


def answer_of(text: str) -> int | None:
    found = re.findall(r"The answer is (-?\d+)", text)
    return int(found[-1]) if found else None


def eval_demo(
    model: str,
    n: int = 200,
    device: str = "auto",
    strategy: str | None = None,
    code_files: int = 4,
    seed: int = EVAL_SEED,
) -> dict:
    llm = LLM(model, device=device, max_num_seqs=64)
    rng = random.Random(seed)
    greedy = SamplingParams(temperature=0, max_tokens=256)

    tasks = [arithmetic(rng) for _ in range(n)]
    prompts = [llm.chat_prompt([{"role": "user", "content": t[0]}]) for t in tasks]
    texts = [o.outputs[0].text for o in llm.generate(prompts, greedy, strategy=strategy)]
    correct = sum(answer_of(x) == t[3] for x, t in zip(texts, tasks, strict=True))
    formed = sum(well_formed(x, len(t[1])) for x, t in zip(texts, tasks, strict=True))

    jobs = [extraction(rng) for _ in range(n)]
    prompts = [llm.chat_prompt([{"role": "user", "content": j[0]}]) for j in jobs]
    answers = [o.outputs[0].text for o in llm.generate(prompts, greedy, strategy=strategy)]
    valid, right = extraction_scores(answers, jobs)
    # the same extraction tasks under a JSON schema of their fields (types only: the values are the test)
    constrained = [
        SamplingParams(temperature=0, max_tokens=256, constraint=Constraint.json_schema(schema_of(want)))
        for _, _, want in jobs
    ]
    outs = [o.outputs[0] for o in llm.generate(prompts, constrained, strategy=strategy)]
    c_valid, c_right = extraction_scores([o.text for o in outs], jobs)

    return (
        {
            "tasks": n,
            "arithmetic_accuracy": correct / n,
            "parallel_structure_well_formed": formed / n,
            "json_valid": valid,
            "json_field_accuracy": right,
            "json_valid_constrained": c_valid,
            "json_field_accuracy_constrained": c_right,
            "forced_token_share_constrained": sum(o.num_forced for o in outs)
            / sum(len(o.token_ids) for o in outs),
        }
        | v2_categories(llm, rng, n, strategy)
        | {
            "code_perplexity": code_perplexity(llm.engine.model_path, llm.tokenizer, code_files),
        }
    )


def probe(rng: random.Random, negative: bool) -> tuple[str, int]:
    """The issue's fresh form (a+b)*(c-d), a..d in 1..30; `negative`: c < d."""
    a, b, c, d = (rng.randint(1, 30) for _ in range(4))
    while negative and c >= d:
        c, d = rng.randint(1, 30), rng.randint(1, 30)
    return f"What is ({a}+{b})*({c}-{d})?", (a + b) * (c - d)


def v2_categories(llm: LLM, rng: random.Random, n: int, strategy: str | None) -> dict:
    """What a newcomer tries: system prompts, a second turn, negative results, values never trained on,
    tool calls (the call, then the answer after the tool's result)."""
    greedy = SamplingParams(temperature=0, max_tokens=256)

    def accuracy(conversations: list[list[dict]], answers: list[int]) -> float:
        outs = llm.chat(conversations, greedy, strategy=strategy)
        return sum(answer_of(o.outputs[0].text) == a for o, a in zip(outs, answers, strict=True)) / len(
            answers
        )

    tasks = [arithmetic(rng) for _ in range(n)]
    system = [
        [{"role": "system", "content": rng.choice(EVAL_SYSTEM_PROMPTS)}, {"role": "user", "content": t[0]}]
        for t in tasks
    ]
    result = {"arithmetic_accuracy_system_prompt": accuracy(system, [t[3] for t in tasks])}

    second, answers = [], []
    for i in range(n):
        if i % 3 == 0:
            first = [
                {"role": "user", "content": "Hey, how are you?"},
                {"role": "assistant", "content": "Fine, thanks."},
            ]
        elif i % 3 == 1:
            message, answer, _ = extraction(rng, unseen=True)
            first = [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        else:
            message, paths, conclusion, answer = arithmetic(rng)
            first = [
                {"role": "user", "content": message},
                {"role": "assistant", "content": trace_text(paths, conclusion, answer)},
            ]
        message, *_, answer = arithmetic(rng, negatives=i % 2 == 1)
        second.append(first + [{"role": "user", "content": message}])
        answers.append(answer)
    result["arithmetic_accuracy_second_turn"] = accuracy(second, answers)

    negative = [probe(rng, True) if i % 2 else _negative(rng) for i in range(n)]
    result["arithmetic_accuracy_negative"] = accuracy(
        [[{"role": "user", "content": m}] for m, _ in negative], [a for _, a in negative]
    )
    fresh = [probe(rng, False) for _ in range(n)]
    result["arithmetic_accuracy_fresh_form"] = accuracy(
        [[{"role": "user", "content": m}] for m, _ in fresh], [a for _, a in fresh]
    )

    for key, unseen in (("unseen", True), ("made_up", False)):
        jobs = [extraction(rng, open_ended=True, unseen=unseen) for _ in range(n)]
        prompts = [llm.chat_prompt([{"role": "user", "content": j[0]}]) for j in jobs]
        plain = [o.outputs[0].text for o in llm.generate(prompts, greedy, strategy=strategy)]
        schemas = [
            SamplingParams(temperature=0, max_tokens=256, constraint=Constraint.json_schema(schema_of(j[2])))
            for j in jobs
        ]
        constrained = [o.outputs[0].text for o in llm.generate(prompts, schemas, strategy=strategy)]
        result[f"json_field_accuracy_{key}"] = extraction_scores(plain, jobs)[1]
        result[f"json_field_accuracy_{key}_constrained"] = extraction_scores(constrained, jobs)[1]
    return result | tool_use(llm, rng, n, strategy)


def _negative(rng: random.Random) -> tuple[str, int]:
    while True:
        message, *_, answer = arithmetic(rng, negatives=True)
        if answer < 0:
            return message, answer


def extraction_scores(texts: list[str], jobs: list[tuple]) -> tuple[float, float]:
    """(share of answers that are a JSON object, share of the wanted fields exactly right)."""
    valid = right = total = 0
    for text, (_, _, want) in zip(texts, jobs, strict=True):
        total += len(want)
        try:
            got = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(got, dict):
            valid += 1
            right += sum(got.get(k) == v for k, v in want.items())
    return valid / len(jobs), right / total


def tool_use(llm: LLM, rng: random.Random, n: int, strategy: str | None) -> dict:
    """All three demo tools offered: the right tool called, its arguments valid under the tool's schema and
    the ones asked for, then (the tool run) the final answer right."""
    import jsonschema

    greedy = SamplingParams(temperature=0, max_tokens=128)
    tools = list(TOOLS.values())
    names = [list(TOOLS)[i % len(TOOLS)] for i in range(n)]
    tasks = [tool_task(rng, name, unseen=True) for name in names]
    chats = [[{"role": "user", "content": message}] for message, _ in tasks]
    outs = llm.chat(chats, greedy, tools=tools, strategy=strategy)
    right_tool = valid = right_args = final = 0
    follow, expected = [], []
    for chat, name, (_, want), out in zip(chats, names, tasks, outs, strict=True):
        calls = out.outputs[0].tool_calls or []
        if not calls or calls[0]["function"]["name"] != name:
            continue
        right_tool += 1
        try:
            args = json.loads(calls[0]["function"]["arguments"])
            jsonschema.validate(args, TOOLS[name]["function"]["parameters"])
        except (json.JSONDecodeError, jsonschema.ValidationError):
            continue
        valid += 1
        right_args += args == want
        result = run_tool(name, args, rng)
        call = {"id": f"call_{len(follow)}", "type": "function", "function": calls[0]["function"]}
        follow.append(
            chat
            + [{"role": "assistant", "content": None, "tool_calls": [call]}]
            + [{"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)}]
        )
        expected.append((name, result))
    if follow:
        outs = llm.chat(follow, greedy, tools=tools, strategy=strategy)
        for out, (name, result) in zip(outs, expected, strict=True):
            final += answers_tool(name, result, out.outputs[0].text)
    return {
        "tool_call_right_tool": right_tool / n,
        "tool_call_valid_arguments": valid / n,
        "tool_call_right_arguments": right_args / n,
        "tool_final_answer_accuracy": final / n,
    }


def answers_tool(name: str, result: dict, text: str) -> bool:
    """Whether the answer after a tool's result states it: the value, the weather, the converted amount."""
    if name == "calculator":
        return answer_of(text) == result.get("result")
    if name == "get_weather":
        return all(str(result.get(k)) in text for k in ("city", "temperature_c", "condition"))
    return "result" in result and str(result["result"]) in text and result["to_unit"] in text


def schema_of(fields: dict) -> dict:
    types = {str: "string", int: "integer", float: "number"}
    return {
        "type": "object",
        "properties": {k: {"type": types[type(v)]} for k, v in fields.items()},
        "required": list(fields),
        "additionalProperties": False,
    }


@torch.inference_mode()
def code_perplexity(path: str, tokenizer, files: int) -> float:
    """Token perplexity on held-out stdlib files (never trained on), in CODE_WINDOW windows."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for f in [p for p in stdlib_files() if held_out(p)][:files]:
        ids = tokenizer.encode(f.read_text(errors="ignore"), add_special_tokens=False)[: 8 * CODE_WINDOW]
        for at in range(0, len(ids) - 1, CODE_WINDOW):
            window = torch.tensor([ids[at : at + CODE_WINDOW]])
            if window.shape[1] < 2:
                continue
            logits = model(window).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return math.exp(nll / max(count, 1))
