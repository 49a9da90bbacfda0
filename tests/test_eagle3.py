"""EAGLE-3: both checkpoint layouts load, a drafting step is the layer's math, decoding stays exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from branchwise import LLM, SamplingParams
from branchwise.constraints import Constraint
from branchwise.models.eagle3 import Eagle3Drafter, save_eagle3
from branchwise.train.eagle3 import new_drafter, ttt_forward

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
DRAFT_VOCAB = list(range(0, 512, 2)) + list(range(1, 200, 2))  # a draft vocabulary smaller than the target's


def random_drafter(target, seed: int, norm_before_residual: bool = False) -> Eagle3Drafter:
    drafter = new_drafter(target, sorted(DRAFT_VOCAB))
    drafter.norm_before_residual = norm_before_residual
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return drafter


def to_speculators(folder, dst, embed: torch.Tensor) -> None:
    """The same drafter in the `speculators` layout: config nesting, `layers.0.` keys, its own embedding."""
    dst.mkdir()
    authors = json.loads((folder / "config.json").read_text())
    config = {
        "speculators_model_type": "eagle3",
        "architectures": ["Eagle3Speculator"],
        "transformer_layer_config": {k: v for k, v in authors.items() if k not in ("eagle_config",)},
        "draft_vocab_size": authors["draft_vocab_size"],
        "norm_before_residual": authors["norm_before_residual"],
        "target_hidden_size": authors["target_hidden_size"],
        "eagle_aux_hidden_state_layer_ids": authors["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
        "speculators_config": {"proposal_methods": [{"speculative_tokens": 3}], "verifier": {}},
    }
    (dst / "config.json").write_text(json.dumps(config))
    state = {
        k.replace("midlayer.", "layers.0."): v for k, v in load_file(folder / "model.safetensors").items()
    }
    state["embed_tokens.weight"] = embed
    save_file(state, str(dst / "model.safetensors"))


@pytest.fixture(scope="module")
def eagle_target(tmp_path_factory, spec_target) -> str:
    """spec_target with a random EAGLE-3 drafter beside it (authors' layout) and the same drafter with
    norm_before_residual and an embedding of its own in the speculators layout."""
    path = tmp_path_factory.mktemp("eagle_target")
    shutil.copytree(spec_target, path, dirs_exist_ok=True)
    target = AutoModelForCausalLM.from_pretrained(spec_target)
    save_eagle3(random_drafter(target, 1), path / "eagle3")
    save_eagle3(random_drafter(target, 2, norm_before_residual=True), path / "tmp_authors")
    embed = torch.randn(target.config.vocab_size, target.config.hidden_size) * 0.5
    to_speculators(path / "tmp_authors", path / "speculators", embed.to(torch.bfloat16))
    return str(path)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """(T, heads, d) rotated the Llama way (halves, not pairs)."""
    d = x.shape[-1]
    freqs = positions[:, None].float() / theta ** (torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cat([freqs.cos()] * 2, -1)[:, None], torch.cat([freqs.sin()] * 2, -1)[:, None]
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


def dense_reference(folder, target, tokens: list[int], features: torch.Tensor) -> torch.Tensor:
    """The EAGLE-3 layer written out from the checkpoint's raw tensors, causal over the entries: entry j
    reads token j and fc of `features[j]` (the position before); returns the last entry's logits over the
    target vocabulary (-inf outside the draft vocabulary)."""
    raw = json.loads((folder / "config.json").read_text())
    cfg = raw.get("transformer_layer_config", raw)
    w = {
        k.replace("layers.0.", "midlayer."): v.float()
        for k, v in load_file(folder / "model.safetensors").items()
    }
    eps, heads, kv = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    embed = w["embed_tokens.weight"] if "embed_tokens.weight" in w else target.model.embed_tokens.weight
    ids = torch.tensor(tokens)
    emb, h = embed[ids], features @ w["fc.weight"].T
    m = "midlayer."
    if raw.get("norm_before_residual"):
        h = residual = rms(h, w[m + "hidden_norm.weight"], eps)
    else:
        residual, h = h, rms(h, w[m + "hidden_norm.weight"], eps)
    x = torch.cat([rms(emb, w[m + "input_layernorm.weight"], eps), h], -1)
    T, d = len(tokens), cfg["hidden_size"] // heads
    pos = torch.arange(T)
    q = rope((x @ w[m + "self_attn.q_proj.weight"].T).view(T, heads, d), pos, theta)
    k = rope((x @ w[m + "self_attn.k_proj.weight"].T).view(T, kv, d), pos, theta)
    v = (x @ w[m + "self_attn.v_proj.weight"].T).view(T, kv, d)
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = torch.einsum("thd,shd->hts", q, k) / d**0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, heads * d)
    residual = residual + attn @ w[m + "self_attn.o_proj.weight"].T
    y = rms(residual, w[m + "post_attention_layernorm.weight"], eps)
    mlp = (
        torch.nn.functional.silu(y @ w[m + "mlp.gate_proj.weight"].T) * (y @ w[m + "mlp.up_proj.weight"].T)
    ) @ w[m + "mlp.down_proj.weight"].T
    out = residual + mlp
    small = rms(out[-1], w["norm.weight"], eps) @ w["lm_head.weight"].T
    full = torch.full((target.config.vocab_size,), float("-inf"))
    full[torch.arange(len(small)) + w["d2t"].long()] = small
    return full


@pytest.mark.parametrize("layout", ["eagle3", "speculators"])
def test_both_layouts_load_and_a_drafting_step_is_the_layers_math(eagle_target, prompts, layout):
    from pathlib import Path

    folder = Path(eagle_target) / layout
    llm = LLM(eagle_target, eagle_model=str(folder), max_num_batched_tokens=256)
    strategy = llm.engine.strategy("eagle3")
    assert strategy.module.fused  # serving runs the lean fused layer; the reference below is dense math
    draft_forward, seen = strategy.draft_forward, []

    def recording(plans):
        logits, carried = draft_forward(plans)
        seen.append(logits)
        return logits, carried

    strategy.draft_forward = recording
    prompt = prompts[1][:20]
    out = llm.generate([prompt], GREEDY, "eagle3", {"num_speculative_tokens": 2})[0].outputs[0]
    target = AutoModelForCausalLM.from_pretrained(eagle_target, attn_implementation="sdpa")
    layers = json.loads((folder / "config.json").read_text())
    layers = (
        layers.get("eagle_aux_hidden_state_layer_ids")
        or layers["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    )
    with torch.no_grad():
        hs = target(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        feats = torch.cat([hs[i][0] for i in layers], -1)  # the residual stream entering each layer
        features = torch.cat([torch.zeros(1, feats.shape[1]), feats])  # entry j: position j - 1
        want = dense_reference(folder, target, prompt + [out.token_ids[0]], features)
    got = seen[0][0]
    finite = torch.isfinite(want)
    assert finite.sum() == len(set(DRAFT_VOCAB))  # the draft vocabulary, mapped through d2t
    assert torch.allclose(got[finite], want[finite], atol=1e-4)
    assert (got[~finite] < -1e30).all()
    assert int(got.argmax()) in DRAFT_VOCAB


def test_eagle3_greedy_equals_autoregressive_mixed_constrained_and_under_preemption(eagle_target, prompts):
    llm = LLM(eagle_target, max_num_batched_tokens=256)
    ar = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, "ar")]
    for k in ({"num_speculative_tokens": 1}, {"num_speculative_tokens": 4}, None):
        got = llm.generate(prompts, GREEDY, "eagle3", k)
        assert [o.outputs[0].token_ids for o in got] == ar
    engine = llm.engine
    for i, p in enumerate(prompts):  # strategies mixed in one batch
        engine.add_request(f"mix{i}", p, GREEDY, ["eagle3", "ar", "mtp", "eagle3", "draft"][i % 5])
    mixed: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for u in engine.step():
            mixed.setdefault(u.request_id, []).extend(u.token_ids)
    assert [mixed[f"mix{i}"] for i in range(len(prompts))] == ar
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    params = SamplingParams(temperature=0, max_tokens=30, constraint=Constraint.json_schema(schema))
    want = [o.outputs[0].token_ids for o in llm.generate(prompts[:4], params, "ar")]
    got = llm.generate(prompts[:4], params, "eagle3", {"num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in got] == want
    tight = LLM(eagle_target, num_blocks=14, max_num_batched_tokens=256)
    got = tight.generate(prompts, GREEDY, "eagle3", {"num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in got] == ar
    assert tight.engine.metrics.preemptions.labels(tight.engine.model_name)._value.get() > 0
    assert tight.engine.blocks.num_available == tight.engine.num_blocks


def test_sampled_tokens_follow_the_autoregressive_distribution(eagle_target):
    from test_speculative import assert_sampled_like_ar

    assert_sampled_like_ar(LLM(eagle_target, max_num_batched_tokens=256), "eagle3")


def test_training_time_test_passes_attend_as_drafting_does(spec_target):
    """Pass 1 is the drafter's own forward; pass 2 at position j equals the drafting step that starts at
    j - 1: the first pass's entries up to it, then the entry that reads the drafter's own output."""
    target = AutoModelForCausalLM.from_pretrained(spec_target, attn_implementation="sdpa")
    drafter = random_drafter(target, 3)
    drafter.set_attention("sdpa")
    torch.manual_seed(0)
    T, width = 12, drafter.fc.weight.shape[1]
    ids, positions = torch.randint(0, 512, (1, T)), torch.arange(T)[None]
    first = torch.cat([torch.zeros(1, 1, width), torch.randn(1, T - 1, width)], 1)
    with torch.no_grad():
        outs = ttt_forward(drafter, target.model.embed_tokens(ids), first, positions)
        assert torch.allclose(outs[0], drafter(ids, first, positions), atol=1e-5)
        for j in (1, 6, 11):
            hidden = torch.cat([drafter.fc(first[:, :j]), outs[0][:, j - 1 : j]], 1)
            step = drafter(ids[:, : j + 1], hidden, positions[:, : j + 1])
            assert torch.allclose(outs[1][:, j], step[:, j], atol=1e-5)
            if j >= 2:  # pass 3: drafting started at j - 2, two own entries
                hidden = torch.cat(
                    [drafter.fc(first[:, : j - 1]), outs[0][:, j - 2 : j - 1], outs[1][:, j - 1 : j]], 1
                )
                step = drafter(ids[:, : j + 1], hidden, positions[:, : j + 1])
                assert torch.allclose(outs[2][:, j], step[:, j], atol=1e-5)


def test_a_folder_of_another_kind_or_for_other_layers_is_a_clear_error(tmp_path, spec_target):
    with pytest.raises(ValueError, match="not an EAGLE-3 drafter"):
        LLM(spec_target, eagle_model=spec_target + "/draft")
    drafter = random_drafter(AutoModelForCausalLM.from_pretrained(spec_target), 4)
    drafter.aux_layers = [0, 1, 2]  # the target has 2 layers
    save_eagle3(drafter, tmp_path / "deep")
    with pytest.raises(ValueError, match="must name target layers 0..1"):
        LLM(spec_target, eagle_model=str(tmp_path / "deep"))


def test_vllm_speculative_config_selects_the_strategy_its_weights_and_k(eagle_target):
    from branchwise.config import SPECULATIVE_METHODS, EngineConfig

    for method, (strategy, field) in SPECULATIVE_METHODS.items():
        spec = {"method": method, "num_speculative_tokens": 3} | ({"model": "/w"} if field else {})
        config = EngineConfig(speculative_config=json.dumps(spec))
        assert (config.strategy, config.num_speculative_tokens) == (strategy, 3)
        assert field is None or getattr(config, field) == "/w"
    for bad in (
        '{"method": "eagle"}',
        '{"method": "ngram", "model": "/w"}',
        '{"method": "mtp", "x": 1}',
        "[1",
    ):
        with pytest.raises(ValueError, match="speculative_config"):
            EngineConfig(speculative_config=bad)
    spec = {"method": "eagle3", "model": eagle_target + "/speculators", "num_speculative_tokens": 2}
    llm = LLM(eagle_target, speculative_config=spec)
    assert llm.engine.config.strategy == "eagle3"
    assert llm.engine.resources["eagle3"].path == eagle_target + "/speculators"


def test_eagle3_trees_are_exact_for_greedy_requests_and_chains_serve_sampled_ones(eagle_target, prompts):
    llm = LLM(eagle_target, max_num_batched_tokens=512)
    ar = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, "ar")]
    strategy = llm.engine.strategy("eagle3")
    propose, trees = strategy.propose, []

    def recording(seqs, budgets):
        plans = propose(seqs, budgets)
        trees.extend(p.payload for p in plans if p.payload is not None)
        return plans

    strategy.propose = recording
    for params in ({"topk": 3, "num_draft_tokens": 12, "num_speculative_tokens": 4}, {"topk": 2}):
        got = llm.generate(prompts, GREEDY, "eagle3", params)
        assert [o.outputs[0].token_ids for o in got] == ar
    assert trees and all(len(t.parent) <= 13 for t in trees[: len(trees) // 2])
    assert any(len(t.paths) > 1 for t in trees)  # they branch
    penalized = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.2)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts[:6], penalized, "ar")]
    got = llm.generate(prompts[:6], penalized, "eagle3", {"topk": 3, "num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in got] == want
    trees.clear()
    sampled = SamplingParams(temperature=0.8, max_tokens=8, seed=3)
    llm.generate(prompts[:4], sampled, "eagle3", {"topk": 3, "num_speculative_tokens": 3})
    assert not trees  # sampled requests draft chains
    tight = LLM(eagle_target, num_blocks=14, max_num_batched_tokens=256)
    got = tight.generate(prompts, GREEDY, "eagle3", {"topk": 2, "num_speculative_tokens": 3})
    assert [o.outputs[0].token_ids for o in got] == ar
    assert tight.engine.blocks.num_available == tight.engine.num_blocks


def test_training_writes_a_drafter_in_the_authors_layout_that_serves(tmp_path, spec_target, prompts):
    from branchwise.train.eagle3 import train_eagle3

    model_dir = tmp_path / "model"
    shutil.copytree(spec_target, model_dir)
    info = train_eagle3(
        str(model_dir), minutes=0.3, device="cpu", num_prompts=16, max_tokens=24, draft_vocab_size=300
    )
    folder = model_dir / "eagle3"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 300
    assert info["steps"] > 0 and json.loads((folder / "training.json").read_text())["steps"] == info["steps"]
    llm = LLM(str(model_dir), max_num_batched_tokens=256)
    ar = [o.outputs[0].token_ids for o in llm.generate(prompts[:4], GREEDY, "ar")]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts[:4], GREEDY, "eagle3")] == ar


def test_the_demo_head_is_lossless_and_accepted_in_chains_and_trees():
    """The shipped drafter on held-out chat prompts (benchmarks/data/chat.jsonl; its training prompts came
    from another seed): greedy == ar, mean accepted length (tokens per target step) >= 2 at depth 3."""
    from branchwise.bench.datasets import load_records
    from branchwise.models.demo import ASSET_DIR

    llm = LLM(max_num_batched_tokens=512)
    assert llm.engine.resources["eagle3"].path == str(ASSET_DIR / "eagle3")
    chats = [llm.chat_prompt(r["messages"]) for r in load_records("chat")[:16]]
    params = SamplingParams(temperature=0, max_tokens=96)
    ar = [o.outputs[0].token_ids for o in llm.generate(chats, params, "ar")]
    for spec in (
        {"num_speculative_tokens": 3},
        {"num_speculative_tokens": 3, "topk": 3, "num_draft_tokens": 12},
    ):
        outs = [o.outputs[0] for o in llm.generate(chats, params, "eagle3", spec)]
        assert [o.token_ids for o in outs] == ar
        assert 1 + sum(o.num_accepted for o in outs) / sum(o.num_draft_steps for o in outs) >= 2.0
