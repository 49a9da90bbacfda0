"""The embedded demo model: its training pipeline, the Multiverse attention rule, the shipped weights."""

from __future__ import annotations

import json
import random

import torch

from branchwise import LLM, SamplingParams
from branchwise.models.demo import ASSET_DIR
from branchwise.train import demo, demo_data
from branchwise.train.demo_data import Encoder
from branchwise.train.eval import answer_of, eval_demo

FLOORS = {  # a little below the model card's figures (branchwise/assets/demo/README.md: 200 tasks); 40 here
    "arithmetic_accuracy": 0.9,
    "parallel_structure_well_formed": 0.95,
    "json_valid": 0.95,
    "json_field_accuracy": 0.9,
    "json_valid_constrained": 1.0,
    "json_field_accuracy_constrained": 0.9,
    "arithmetic_accuracy_system_prompt": 0.85,
    "arithmetic_accuracy_second_turn": 0.75,
    "json_field_accuracy_unseen": 0.8,
    "json_field_accuracy_unseen_constrained": 0.8,
    "json_field_accuracy_made_up": 0.85,
    "tool_call_right_tool": 0.95,
    "tool_call_valid_arguments": 0.95,
    "tool_call_right_arguments": 0.8,
    "tool_final_answer_accuracy": 0.75,
    # below the 90 % the model should reach (issue 26): what version 2 does, kept from regressing
    "arithmetic_accuracy_negative": 0.2,
    "arithmetic_accuracy_fresh_form": 0.4,
}


def test_training_reduces_the_loss_in_a_few_steps(tmp_path):
    tokenizer = demo.build_tokenizer(seed=1, samples=200)
    tokenizer.save_pretrained(tmp_path)
    data = demo.make_dataset(str(tmp_path), 300, seed=1, workers=1)
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = demo.new_model(shape, tokenizer, seed=1)
    # max_steps ends it; the time budget only bounds a machine slow enough to miss it (a loaded CI host)
    # 4 rows of 640 tokens a step: half the time of 8, and the loss still falls about 20 % in 40 steps
    history = demo.train(model, data, 600, torch.device("cpu"), 4, 3e-3, "test", max_steps=40)
    assert len(history) == 40
    assert sum(history[-5:]) / 5 < 0.9 * sum(history[:5]) / 5


def test_multiverse_paths_are_isolated_and_share_start_positions(tmp_path):
    """Tokens of one <Path> see no other path, all paths start at one position, the conclusion sees all."""
    tokenizer = demo.build_tokenizer(seed=2, samples=100)
    ex = Encoder(tokenizer).arithmetic(random.Random(3), parallel=True)
    path, after, pos = torch.tensor(ex.path), torch.tensor(ex.after), torch.tensor(ex.pos)
    mask = demo.visibility(torch.zeros(1, len(ex.ids), dtype=torch.int32), path[None], after[None])[0, 0]
    paths = sorted(set(ex.path) - {0})
    assert len(paths) >= 2
    starts = [int(pos[path == k].min()) for k in paths]
    assert len(set(starts)) == 1
    for k in paths:
        rows = (path == k).nonzero()[:, 0]
        others = ((path != k) & (path != 0)).nonzero()[:, 0]
        assert not mask[rows][:, others].any()
    conclusion = (after == 1).nonzero()[:, 0]
    assert mask[conclusion][:, (path != 0).nonzero()[:, 0]].all()
    # loss is not taken on the forced `<Path>k:` openers: their predecessor is not their context
    tags = set(tokenizer.convert_tokens_to_ids(["<Path>", "<Conclusion>"]))
    assert all(ex.loss[i] == 0 for i, t in enumerate(ex.ids) if t in tags)


def test_shipped_demo_loads_through_the_standard_path_and_fits_the_budget():
    from transformers import AutoModelForCausalLM

    from branchwise.models import demo as demo_model
    from branchwise.models.loader import load_tokenizer

    assert demo_model.resolve("demo") == str(ASSET_DIR)
    for weights in ASSET_DIR.rglob("*.safetensors"):  # target, draft, MTP module, Medusa heads
        assert weights.stat().st_size <= 16 * 2**20, weights
    assert sum(f.stat().st_size for f in ASSET_DIR.rglob("*") if f.is_file()) <= 24 * 2**20  # the package
    target = AutoModelForCausalLM.from_pretrained(ASSET_DIR)
    draft = AutoModelForCausalLM.from_pretrained(ASSET_DIR / "draft")
    assert target.config.model_type == "llama" and draft.config.vocab_size == target.config.vocab_size
    assert sum(p.numel() for p in draft.parameters()) < 0.2 * sum(p.numel() for p in target.parameters())
    tokenizer = load_tokenizer(str(ASSET_DIR))
    assert tokenizer.chat_template and all(t in tokenizer.get_vocab() for t in ("<Parallel>", "</Path>"))
    assert (ASSET_DIR / "README.md").exists()


def test_greedy_generation_on_a_fixed_prompt_is_deterministic():
    params = SamplingParams(temperature=0, max_tokens=64)
    runs = []
    for _ in range(2):
        llm = LLM()  # the default model is the shipped demo
        prompt = llm.chat_prompt([{"role": "user", "content": "What is (12+7)*(30-4)?"}])
        runs.append(llm.generate(prompt, params)[0].outputs[0].text)
    assert runs[0] == runs[1]
    assert runs[0].startswith("<Parallel>\n<Goal>\n<Outline>1: 12+7</Outline>")


def test_eval_on_a_small_sample_meets_the_floor():
    result = eval_demo(str(ASSET_DIR), n=40, device="cpu", code_files=1)
    for key, floor in FLOORS.items():
        assert result[key] >= floor, (key, result[key])
    assert result["code_perplexity"] < 60


def test_every_step_of_a_trace_with_negative_values_equals_its_answer():
    rng = random.Random(5)
    for _ in range(3000):
        message, paths, conclusion, answer = demo_data.arithmetic(rng, negatives=True)
        expr = message[message.index("(") : message.rindex(")") + 1]
        assert eval(expr) == answer, message
        assert all(eval(step) == answer for step in conclusion.split(" = ")), conclusion
        for outline, path in paths:
            assert all(eval(s.split(": ")[-1]) == eval(outline.split(": ")[1]) for s in path.split(" = "))
    assert demo_data.arithmetic(random.Random(9)) == demo_data.arithmetic(random.Random(9), negatives=False)


def test_the_eval_values_never_occur_in_training_examples():
    rng = random.Random(6)
    unseen = set(demo_data.UNSEEN_NAMES + demo_data.UNSEEN_CITIES + demo_data.UNSEEN_BRANDS)
    words = {w for v in unseen for w in v.split()}
    for _ in range(5000):
        messages, tools, trace = demo_data.conversation(rng)
        text = json.dumps(messages)
        assert not any(f" {w} " in text or f'"{w}"' in text or f" {w}." in text for w in words), text
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        assert system not in demo_data.EVAL_SYSTEM_PROMPTS


def test_a_chat_example_learns_the_assistant_turns_only():
    """Through the real chat template: targets are each assistant turn and its <|im_end|>, nothing else."""
    from branchwise.models.loader import load_tokenizer

    tok = load_tokenizer(str(ASSET_DIR))
    rng = random.Random(7)
    seen_tools = 0
    for _ in range(60):
        messages, tools, trace = demo_data.conversation(rng)
        if trace is not None:
            continue
        ex = Encoder(tok).chat(messages, tools, None, parallel=False)
        text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
        assert tok.decode(ex.ids) == text.removesuffix("\n") or tok.decode(ex.ids) == text
        targets = tok.decode([t for t, w in zip(ex.ids, ex.loss, strict=True) if w])
        turns = [m for m in messages if m["role"] == "assistant"]
        assert targets.count("<|im_end|>") == len(turns)
        for m in turns:
            assert (m["content"] or "") in targets
        seen_tools += tools is not None
    assert seen_tools > 0


def test_newcomer_prompts_from_the_issue_get_right_answers():
    """The issue's examples that version 2 gets right: a system prompt, a second turn, a fresh name. (Its
    small-number and negative ones, (3+4)*(5-2) and (3+4)*(2-9), it still gets wrong: the model card.)"""
    llm = LLM()
    greedy = SamplingParams(temperature=0, max_tokens=200)
    q = {"role": "user", "content": "What is (12+7)*(30-4)?"}
    chats = [
        [{"role": "system", "content": "You are a terse assistant."}, q],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": demo_data.INTRO}, q],
    ]
    outs = [o.outputs[0].text for o in llm.chat(chats, greedy)]
    assert [answer_of(t) for t in outs] == [494, 494], outs
    ask = "Maria Lopez, aged 27, works in Valencia. Extract name, age and city as JSON."
    out = llm.chat([{"role": "user", "content": ask}], greedy).outputs[0].text
    assert json.loads(out) == {"name": "Maria Lopez", "age": 27, "city": "Valencia"}


def test_the_agent_loop_example_answers_with_each_tool():
    """examples/agent_loop.py against a real server on the demo: the right call, then its result read."""
    import importlib.util
    from pathlib import Path

    import openai
    from test_server import running_server

    path = Path(__file__).parent.parent / "examples" / "agent_loop.py"
    spec = importlib.util.spec_from_file_location("agent_loop", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with running_server() as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        for question, tool, wanted in (
            ("What is (12+7)*(30-4)?", "calculator", "494"),
            ("What's the weather in Valencia?", "get_weather", "Valencia"),
            ("Convert 42 km to miles.", "convert_units", "26.1"),
        ):
            transcript = example.agent(client, "demo", question, "ar")
            assert transcript[1]["tool_calls"][0]["function"]["name"] == tool, transcript
            assert transcript[2]["role"] == "tool" and transcript[-1]["role"] == "assistant"
            assert wanted in transcript[-1]["content"], transcript
