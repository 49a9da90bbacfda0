"""Multiverse parallel paths on the demo model: exact w.r.t. the trained attention rule, fewer steps."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from branchwise import LLM, SamplingParams
from branchwise.models.demo import ASSET_DIR
from branchwise.train import demo
from branchwise.train.demo_data import arithmetic
from branchwise.train.eval import EVAL_SEED, answer_of, well_formed

GREEDY = SamplingParams(temperature=0, max_tokens=200)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(ASSET_DIR), max_num_seqs=256)


def tasks(n: int, seed: int = EVAL_SEED):
    rng = random.Random(seed)
    return [arithmetic(rng) for _ in range(n)]


def chat(llm: LLM, message: str) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": message}])


def multiverse_layout(tokenizer, ids: list[int], prompt_len: int):
    """Per token of a forked answer: path id, sees-all-paths flag, position and whether it was sampled
    (forced `<Path>k:` openers and `<Conclusion>` are not), as the demo model was trained."""
    vocab = tokenizer.get_vocab()
    goal_end, path, path_end, conclusion = (
        vocab[t] for t in ("</Goal>", "<Path>", "</Path>", "<Conclusion>")
    )
    start = ids.index(goal_end, prompt_len) + 1
    n = len(ids)
    path_id, after, pos, sampled = [0] * n, [0] * n, list(range(n)), [i >= prompt_len for i in range(n)]
    at, k, longest = start, 0, 0
    while ids[at] == path:
        k += 1
        end = ids.index(path_end, at) + 1
        forced = len(tokenizer.encode(f"<Path>{k}:", add_special_tokens=False))
        for i in range(at, end):
            path_id[i], pos[i], sampled[i] = k, start + i - at, i - at >= forced
        longest, at = max(longest, end - at), end
    assert ids[at] == conclusion and k >= 2
    for i in range(at, n):
        after[i], pos[i] = 1, start + longest + i - at
    sampled[at] = False
    return path_id, after, pos, sampled


def test_forked_paths_equal_one_sequence_under_the_multiverse_mask(llm):
    """Greedy tokens of the forked execution == argmax of one dense forward of the whole answer with the
    path-isolation mask and Multiverse positions (the rule the model was trained with)."""
    model = AutoModelForCausalLM.from_pretrained(
        str(ASSET_DIR), dtype=torch.float32, attn_implementation="branchwise_train"
    ).eval()
    checked = 0
    for message, parts, _, _ in tasks(12, seed=7):
        prompt = chat(llm, message)
        out = llm.generate(prompt, GREEDY, strategy="multiverse")[0].outputs[0]
        if not well_formed(out.text, len(parts)):
            continue
        ids = prompt + out.token_ids
        path_id, after, pos, sampled = multiverse_layout(llm.tokenizer, ids, len(prompt))
        t = lambda x: torch.tensor([x])  # noqa: E731
        mask = demo.visibility(torch.zeros(1, len(ids), dtype=torch.int32), t(path_id), t(after))
        with torch.inference_mode():
            logits = model(input_ids=t(ids), position_ids=t(pos), train_mask=mask, use_cache=False).logits[0]
        # token i was sampled from the logits of the token before it *in its own path* (or the prefix)
        for i in range(len(prompt), len(ids)):
            if not sampled[i]:
                continue
            prev = i - 1
            assert logits[prev].argmax().item() == ids[i], (i, llm.tokenizer.decode(ids[i]))
        checked += 1
    assert checked >= 6


def parallelism(llm: LLM) -> tuple[float, float]:
    """(count, sum) of the multiverse_parallelism histogram: output tokens per step of each request."""
    hist = [m for m in llm.engine.metrics.registry.collect() if m.name.endswith("multiverse_parallelism")][0]
    values = {s.name.rsplit("_", 1)[-1]: s.value for s in hist.samples if "le" not in s.labels}
    return values.get("count", 0.0), values.get("sum", 0.0)


def test_multiverse_is_as_accurate_as_sequential_in_fewer_steps(llm):
    problems = tasks(200)
    prompts = [chat(llm, t[0]) for t in problems]
    results = {}
    par_before = parallelism(llm)
    for strategy in ("ar", "multiverse"):
        before = llm.engine.num_steps
        texts = [o.outputs[0].text for o in llm.generate(prompts, GREEDY, strategy=strategy)]
        correct = sum(answer_of(x) == t[3] for x, t in zip(texts, problems, strict=True)) / len(problems)
        results[strategy] = (correct, llm.engine.num_steps - before)
    (seq_acc, seq_steps), (par_acc, par_steps) = results["ar"], results["multiverse"]
    assert par_acc >= seq_acc - 0.02
    assert par_steps < seq_steps
    count, total = parallelism(llm)
    n = count - par_before[0]
    assert n == len(problems) and (total - par_before[1]) / n > 1.0
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_streaming_client_sees_the_paths_in_outline_order_and_blocks_return(llm):
    message, parts, _, _ = tasks(1, seed=11)[0]
    updates = list(llm.stream(chat(llm, message), GREEDY, strategy="multiverse"))
    text = "".join(u.text for u in updates)
    assert well_formed(text, len(parts))
    assert [text.index(f"<Path>{k}:") for k in range(1, len(parts) + 1)] == sorted(
        text.index(f"<Path>{k}:") for k in range(1, len(parts) + 1)
    )
    assert updates[-1].finish_reason == "stop"
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_aborting_a_request_while_its_paths_run_frees_every_path(llm):
    engine = llm.engine
    message, _, _, _ = tasks(1, seed=13)[0]
    engine.add_request("mv-abort", chat(llm, message), GREEDY, "multiverse")
    while not any(s.hidden for s in engine.scheduler.running):
        assert engine.has_unfinished()
        engine.step()
    engine.abort_request("mv-abort")
    updates = []
    while engine.has_unfinished():
        updates += engine.step()
    assert [u.finish_reason for u in updates if u.finish_reason] == ["abort"]
    assert not engine.scheduler.running and engine.blocks.num_available == engine.num_blocks


def multiverse_grammar(tokenizer) -> str:
    """A Lark grammar of the trace; the tags are added tokens, which llguidance matches by id."""
    tag = {
        t: f"<[{i}]>"
        for t, i in tokenizer.get_vocab().items()
        if t.startswith(("<P", "<G", "<O", "<C", "</"))
    }
    return rf"""
start: {tag["<Parallel>"]} "\n" {tag["<Goal>"]} "\n" outline outline+ {tag["</Goal>"]} path path+ conclusion
conclusion: {tag["<Conclusion>"]} CALC {tag["</Conclusion>"]} "\n" {tag["</Parallel>"]} answer
answer: "\nThe answer is " NUM "."
outline: {tag["<Outline>"]} INDEX ": " EXPR {tag["</Outline>"]} "\n"
path: {tag["<Path>"]} INDEX ": " EXPR " = " NUM {tag["</Path>"]}
INDEX: /[1-8]/
EXPR: /[0-9]{{1,3}}[+*-][0-9]{{1,3}}/
CALC: /[0-9+*= -]{{1,60}}/
NUM: /-?[0-9]{{1,5}}/
"""


def test_constrained_paths_each_follow_the_grammar_and_merge_valid(llm):
    """Under a Lark grammar of the trace, every path gets its own matcher copy; outputs match it."""
    import re

    from branchwise.constraints import Constraint

    pattern = re.compile(
        r"<Parallel>\n<Goal>\n(<Outline>[1-8]: [0-9]{1,3}[+*-][0-9]{1,3}</Outline>\n){2,}</Goal>"
        r"(<Path>[1-8]: [0-9]{1,3}[+*-][0-9]{1,3} = -?[0-9]{1,5}</Path>){2,}<Conclusion>[0-9+*= -]{1,60}"
        r"</Conclusion>\n</Parallel>\nThe answer is -?[0-9]{1,5}\."
    )
    params = SamplingParams(
        temperature=0.8,
        seed=3,
        max_tokens=200,
        constraint=Constraint("grammar", multiverse_grammar(llm.tokenizer)),
    )
    problems = tasks(8, seed=17)
    before = counter(llm, "multiverse_paths")
    outs = llm.generate([chat(llm, t[0]) for t in problems], params, strategy="multiverse")
    for out in outs:
        assert pattern.fullmatch(out.outputs[0].text), out.outputs[0].text
    assert counter(llm, "multiverse_paths") - before >= 16  # the requests really forked
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def counter(llm: LLM, suffix: str) -> float:
    return sum(
        s.value
        for m in llm.engine.metrics.registry.collect()
        if m.name.endswith(suffix)
        for s in m.samples
        if s.name.endswith("_total")
    )


def test_nested_parallel_blocks_fork_inside_a_path_and_merge(llm):
    """A grammar makes every outer path open its own `<Parallel>` block: each path forks again at its
    inner `</Goal>`, the inner paths merge into their path, the outer paths into the request."""
    import re

    from branchwise.constraints import Constraint

    tag = {
        t: f"<[{i}]>"
        for t, i in llm.tokenizer.get_vocab().items()
        if t.startswith(("<P", "<G", "<O", "<C", "</"))
    }
    goal = f'{tag["<Parallel>"]} "\\n" {tag["<Goal>"]} "\\n" outline outline+ {tag["</Goal>"]}'
    end = f'{tag["<Conclusion>"]} CALC {tag["</Conclusion>"]} "\\n" {tag["</Parallel>"]}'
    grammar = rf"""
start: {goal} outer_path outer_path+ {end} "\nThe answer is " NUM "."
outer_path: {tag["<Path>"]} INDEX ": " {goal} inner_path inner_path+ {end} {tag["</Path>"]}
inner_path: {tag["<Path>"]} INDEX ": " EXPR " = " NUM {tag["</Path>"]}
outline: {tag["<Outline>"]} INDEX ": " EXPR {tag["</Outline>"]} "\n"
INDEX: /[1-8]/
EXPR: /[0-9]{{1,3}}[+*-][0-9]{{1,3}}/
CALC: /[0-9+*= -]{{1,40}}/
NUM: /-?[0-9]{{1,5}}/
"""
    constraint = Constraint("grammar", grammar)
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=400, constraint=constraint)
    problems = tasks(4, seed=23)
    before = counter(llm, "multiverse_paths")
    outs = llm.generate([chat(llm, t[0]) for t in problems], params, strategy="multiverse")
    goal_re = r"<Parallel>\n<Goal>\n(<Outline>[1-8]: [0-9+*-]+</Outline>\n){2,}</Goal>"
    end_re = r"<Conclusion>[0-9+*= -]+</Conclusion>\n</Parallel>"
    inner = rf"{goal_re}(<Path>[1-8]: [0-9+*-]+ = -?[0-9]+</Path>){{2,}}{end_re}"
    outer = re.compile(rf"{goal_re}(<Path>[1-8]: {inner}</Path>){{2,}}{end_re}\nThe answer is -?[0-9]+\.")
    for out in outs:
        assert outer.fullmatch(out.outputs[0].text), out.outputs[0].text
    # per request: two or more outer paths, each forking two or more inner paths
    forked = counter(llm, "multiverse_paths") - before
    assert forked >= 4 * (2 + 2 * 2)
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_paths_longer_than_96_tokens_merge_and_come_back_the_same_from_a_swapped_family(llm):
    """A grammar forces paths of over 100 digits (one token each): no path is cut, and under a KV pool
    that forces the families out and back in (paths and merged sequences alike) the tokens are the same."""
    import re

    from branchwise.constraints import Constraint

    tag = {
        t: f"<[{i}]>"
        for t, i in llm.tokenizer.get_vocab().items()
        if t.startswith(("<P", "<G", "<O", "<C", "</"))
    }
    goal = f'{tag["<Parallel>"]} "\\n" {tag["<Goal>"]} "\\n" outline outline+ {tag["</Goal>"]}'
    grammar = rf"""
start: {goal} path path+ {tag["<Conclusion>"]} CALC {tag["</Conclusion>"]} "\n" {tag["</Parallel>"]}
path: {tag["<Path>"]} INDEX ": " LONG {tag["</Path>"]}
outline: {tag["<Outline>"]} INDEX ": " EXPR {tag["</Outline>"]} "\n"
INDEX: /[1-8]/
EXPR: /[0-9]{{1,3}}[+*-][0-9]{{1,3}}/
LONG: /[0-9]{{100,110}}/
CALC: /[0-9+*= -]{{1,20}}/
"""
    params = SamplingParams(temperature=0, max_tokens=700, constraint=Constraint("grammar", grammar))
    prompts = [chat(llm, t[0]) for t in tasks(8, seed=29)]
    outs = llm.generate(prompts, params, strategy="multiverse")
    for out in outs:
        paths = re.findall(r"<Path>[1-8]: ([0-9]+)</Path>", out.outputs[0].text)
        assert len(paths) >= 2 and all(len(llm.tokenizer.encode(p)) > 96 for p in paths), out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"
    small = LLM(str(ASSET_DIR), num_blocks=48)  # 768 slots: the families swap out and back
    swapped = []
    swap_out = small.engine.scheduler._swap_out

    def watch(family):  # a family of one is a merged sequence: its K/V is not a causal recompute's
        swapped.append(len(family) > 1)
        return swap_out(family)

    small.engine.scheduler._swap_out = watch
    again = small.generate(prompts, params, strategy="multiverse")
    assert True in swapped and False in swapped  # paths' families, and merged sequences
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    assert small.engine.blocks.num_available == small.engine.blocks.num_blocks
