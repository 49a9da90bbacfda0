"""The embedded demo model: its training pipeline, the Multiverse attention rule, the shipped weights."""

from __future__ import annotations

import random

import torch

from branchwise import LLM, SamplingParams
from branchwise.models.demo import ASSET_DIR
from branchwise.train import demo
from branchwise.train.demo_data import Encoder
from branchwise.train.eval import eval_demo

# a little below the model card's figures (branchwise/assets/demo/README.md: 200 tasks), here on 40 tasks;
# arithmetic accuracy (5 % on the CPU-trained model) has no floor worth the name yet
FLOORS = {  # a little below the model card's figures on 200 tasks
    "arithmetic_accuracy": 0.9,
    "parallel_structure_well_formed": 0.95,
    "json_valid": 0.95,
    "json_field_accuracy": 0.9,
    "json_valid_constrained": 1.0,
    "json_field_accuracy_constrained": 0.9,
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
    history = demo.train(model, data, 120, torch.device("cpu"), 8, 3e-3, "test", max_steps=40)
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
