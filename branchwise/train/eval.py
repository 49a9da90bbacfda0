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
from branchwise.train.demo import SEQ_LEN, held_out
from branchwise.train.demo_data import arithmetic, extraction
from branchwise.train.tokenizer import stdlib_files

EVAL_SEED = 987_654_321  # a stream the training seeds never produce


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
    valid = fields = right = 0
    for text, (_, _, want) in zip(answers, jobs, strict=True):
        fields += len(want)
        try:
            got = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(got, dict):
            valid += 1
            right += sum(got.get(k) == v for k, v in want.items())

    # the same extraction tasks under a JSON schema of their fields (types only: the values are the test)
    constrained = [
        SamplingParams(temperature=0, max_tokens=256, constraint=Constraint.json_schema(schema_of(want)))
        for _, _, want in jobs
    ]
    outs = [o.outputs[0] for o in llm.generate(prompts, constrained, strategy=strategy)]
    c_valid = c_right = 0
    for out, (_, _, want) in zip(outs, jobs, strict=True):
        try:
            got = json.loads(out.text)
        except json.JSONDecodeError:
            continue
        c_valid += 1
        c_right += sum(got.get(k) == v for k, v in want.items())

    return {
        "tasks": n,
        "arithmetic_accuracy": correct / n,
        "parallel_structure_well_formed": formed / n,
        "json_valid": valid / n,
        "json_field_accuracy": right / fields,
        "json_valid_constrained": c_valid / n,
        "json_field_accuracy_constrained": c_right / fields,
        "forced_token_share_constrained": sum(o.num_forced for o in outs)
        / sum(len(o.token_ids) for o in outs),
        "code_perplexity": code_perplexity(llm.engine.model_path, llm.tokenizer, code_files),
    }


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
    """Token perplexity on held-out stdlib files (never trained on), in SEQ_LEN windows."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for f in [p for p in stdlib_files() if held_out(p)][:files]:
        ids = tokenizer.encode(f.read_text(errors="ignore"), add_special_tokens=False)[: 8 * SEQ_LEN]
        for at in range(0, len(ids) - 1, SEQ_LEN):
            window = torch.tensor([ids[at : at + SEQ_LEN]])
            if window.shape[1] < 2:
                continue
            logits = model(window).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return math.exp(nll / max(count, 1))
