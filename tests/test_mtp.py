"""MTP modules as drafters: lossless, their K/V kept exact across rollbacks, loaded from the open layouts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from branchwise import LLM, SamplingParams
from branchwise.models.mtp import OWN_FILE, MTPModule, find_mtp, load_mtp, save_mtp

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def outputs(llm: LLM, prompts, params, strategy, **strategy_params):
    outs = llm.generate(prompts, params, strategy=strategy, strategy_params=strategy_params or None)
    return [o.outputs[0] for o in outs]


@pytest.fixture(scope="module")
def random_mtp_target(tmp_path_factory, spec_target) -> str:
    """The speculative target with a random MTP module: acceptance near zero."""
    path = tmp_path_factory.mktemp("random_mtp")
    shutil.copytree(spec_target, path, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(spec_target)
    torch.manual_seed(5)
    module = MTPModule(model)
    for p in module.parameters():
        p.data.normal_(0, 0.05) if p.dim() > 1 else p.data.fill_(1.0)
    save_mtp(module, path / OWN_FILE)
    return str(path)


@pytest.mark.parametrize("which", ["spec_target", "random_mtp_target"])
def test_mtp_greedy_equals_autoregressive_for_k_1_to_3(which, request, prompts):
    llm = LLM(request.getfixturevalue(which), max_num_batched_tokens=256)
    assert "mtp" in llm.engine.resources
    ar = [o.token_ids for o in outputs(llm, prompts, GREEDY, "ar")]
    for k in (1, 2, 3):
        spec = outputs(llm, prompts, GREEDY, "mtp", num_speculative_tokens=k)
        assert [o.token_ids for o in spec] == ar
        assert all(0 < o.num_drafted <= k * o.num_draft_steps for o in spec)
        accepted = [o.num_accepted / o.num_drafted for o in spec]
        if which == "spec_target":  # sequences in one batch accept different numbers of tokens
            assert max(accepted) > 0.3 and max(accepted) - min(accepted) > 0.1
        else:
            assert max(accepted) < 0.2
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_mtp_drafts_equal_a_dense_recomputation_of_the_module(spec_target, prompts):
    """Every drafted token (depth 1 and 2) is what the module gives when recomputed from scratch over the
    final text: its K/V catch-up after chunked prefill, accepted and rejected drafts is exact."""
    llm = LLM(spec_target, max_num_batched_tokens=32, prefix_cache=False)
    strategy = llm.engine.strategy("mtp")
    assert strategy.module.fused  # the drafts come from the lean fused layer; the reference is HF's module
    seen = []
    propose = strategy.propose

    def recording(seqs, budgets):
        plans = propose(seqs, budgets)
        seen.extend((p.seq.request_id, p.seq.num_computed, p.drafts[:2]) for p in plans if p.drafts)
        return plans

    strategy.propose = recording
    outs = llm.generate(prompts[:4], GREEDY, "mtp", {"num_speculative_tokens": 2})
    assert sum(o.outputs[0].num_accepted for o in outs) > 0
    model = AutoModelForCausalLM.from_pretrained(spec_target, attn_implementation="sdpa")
    module = load_mtp(model, *find_mtp(spec_target))
    module.set_attention("sdpa")
    checked = 0
    with torch.no_grad():
        for out in outs:
            ids = torch.tensor(out.prompt_token_ids + out.outputs[0].token_ids)
            hidden = model.model(input_ids=ids[None]).last_hidden_state[0]
            x = module(ids, torch.cat([torch.zeros_like(hidden[:1]), hidden[:-1]]), torch.arange(len(ids)))
            for rid, n, drafts in seen:
                if rid != out.request_id:
                    continue
                assert int(module.logits(x[n]).argmax()) == drafts[0]
                if len(drafts) == 2:  # depth 2: the module on its own output and its first draft
                    tokens = torch.cat([ids[: n + 1], torch.tensor(drafts[:1])])
                    inputs = torch.cat([torch.zeros_like(hidden[:1]), hidden[:n], x[n : n + 1]])
                    x2 = module(tokens, inputs, torch.arange(n + 2))
                    assert int(module.logits(x2[-1]).argmax()) == drafts[1]
                checked += 1
    assert checked > 20


def test_mtp_is_lossless_under_preemption_and_prefix_cache_hits(spec_target, prompts):
    shared = prompts[1][:64]
    requests = [shared + p[:8] for p in prompts[:6]]
    llm = LLM(spec_target, max_num_batched_tokens=256)
    ar = [o.token_ids for o in outputs(llm, requests, GREEDY, "ar")]
    assert [o.token_ids for o in outputs(llm, requests, GREEDY, "mtp")] == ar  # prefix hits after ar
    tight = LLM(spec_target, num_blocks=14, max_num_batched_tokens=256)  # forces preemption
    assert [o.token_ids for o in outputs(tight, requests, GREEDY, "mtp", num_speculative_tokens=3)] == ar
    assert tight.engine.metrics.preemptions.labels(tight.engine.model_name)._value.get() > 0
    assert tight.engine.blocks.num_available == tight.engine.num_blocks


def test_mtp_reuses_cached_blocks_only_where_its_own_entries_are(spec_target, prompts):
    """A prefix-cache hit on blocks an MTP request computed keeps the module's context; on blocks only
    the target computed (an 'ar' request), the module attends to its own entries after them."""
    requests = [prompts[1][:64] + p[:8] for p in prompts[:4]]

    def windows(llm, strategy):
        seen = []
        draft_plan = strategy.draft_plan

        def recording(seq, depth, drafted, carry):
            plan = draft_plan(seq, depth, drafted, carry)
            seen.append(plan.first_block)
            return plan

        strategy.draft_plan = recording  # a fixed K: the adaptive one may rightly stop drafting
        assert [o.token_ids for o in outputs(llm, requests, GREEDY, "mtp", num_speculative_tokens=2)] == ar
        strategy.draft_plan = draft_plan
        return seen

    llm = LLM(spec_target, max_num_batched_tokens=256)
    ar = [o.token_ids for o in outputs(llm, requests, GREEDY, "ar")]
    assert min(windows(llm, llm.engine.strategy("mtp"))) == 4  # 64 cached tokens computed by 'ar'
    fresh = LLM(spec_target, max_num_batched_tokens=256)
    windows(fresh, fresh.engine.strategy("mtp"))
    assert set(windows(fresh, fresh.engine.strategy("mtp"))) == {0}  # hits on its own blocks


def _checkpoint_with_mtp_keys(src: str, dst, prefix: str, rename: dict, hidden_first: bool) -> None:
    """The target's folder with the MTP layer stored inside its own model.safetensors (no mtp file)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    (dst / OWN_FILE).unlink()
    mtp = load_file(str(f"{src}/{OWN_FILE}"))
    weights = load_file(str(dst / "model.safetensors"))
    layers = json.loads((dst / "config.json").read_text())["num_hidden_layers"]
    for key, value in mtp.items():
        rest = key.removeprefix(f"model.layers.{layers}.")
        part = rest.split(".")[0] if not rest.startswith("shared_head") else "shared_head.norm"
        if part in rename:
            rest = rename[part] + rest[len(part) :]
            if hidden_first and part == "eh_proj":
                value = torch.cat(value.chunk(2, dim=1)[::-1], dim=1)
        weights[prefix + rest] = value
    if not hidden_first:
        weights[prefix + "shared_head.head.weight"] = weights["lm_head.weight"].clone()
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layout", ["deepseek_v3", "mimo"])
def test_mtp_layer_inside_a_checkpoint_loads_in_deepseek_and_mimo_layouts(
    layout, tmp_path, spec_target, prompts
):
    dst = tmp_path / layout
    if layout == "deepseek_v3":  # model.layers.{num_hidden_layers}.{enorm, hnorm, eh_proj, shared_head, ...}
        _checkpoint_with_mtp_keys(spec_target, dst, "model.layers.2.", {}, hidden_first=False)
    else:  # model.mtp_layers.0.{token_layernorm, hidden_layernorm, input_proj [hidden, emb], final_layernorm}
        rename = {
            "enorm": "token_layernorm",
            "hnorm": "hidden_layernorm",
            "eh_proj": "input_proj",
            "shared_head.norm": "final_layernorm",
        }
        _checkpoint_with_mtp_keys(spec_target, dst, "model.mtp_layers.0.", rename, hidden_first=True)
    assert find_mtp(str(dst))[1] == ("model.layers.2." if layout == "deepseek_v3" else "model.mtp_layers.0.")
    # no prefix cache: a prompt cached by the 'ar' run would leave the module's K/V of it unwritten
    want = LLM(spec_target, max_num_batched_tokens=256, prefix_cache=False)
    got = LLM(str(dst), max_num_batched_tokens=256, prefix_cache=False)
    for a, b in zip(
        *(x.engine.resources["mtp"].weights.state_dict().values() for x in (want, got)), strict=True
    ):
        assert torch.equal(a, b)
    ar = [o.token_ids for o in outputs(got, prompts[:6], GREEDY, "ar")]
    spec = outputs(got, prompts[:6], GREEDY, "mtp", num_speculative_tokens=2)
    assert [o.token_ids for o in spec] == ar
    assert sum(o.num_accepted for o in spec) == sum(
        o.num_accepted for o in outputs(want, prompts[:6], GREEDY, "mtp", num_speculative_tokens=2)
    )


def test_mtp_strategy_without_a_module_is_refused_clearly(tiny_llama, prompts):
    llm = LLM(tiny_llama)
    with pytest.raises(ValueError, match="needs an MTP module"):
        llm.generate(prompts[:1], GREEDY, "mtp")
    with pytest.raises(ValueError, match="holds no MTP layer"):
        LLM(tiny_llama, mtp_model=f"{tiny_llama}/model.safetensors")


def test_demo_mtp_module_is_lossless_and_accepts_most_first_drafts():
    """The shipped module, K = 1, on held-out chat prompts (benchmarks/data/chat.jsonl, another seed than
    its training prompts): mean accepted length (tokens per target step) >= 1.6."""
    from branchwise.bench.datasets import load_records
    from branchwise.models.demo import ASSET_DIR

    llm = LLM()
    layers = llm.engine.model.config.num_hidden_layers
    assert find_mtp(str(ASSET_DIR)) == (str(ASSET_DIR / OWN_FILE), f"model.layers.{layers}.")
    chats = [llm.chat_prompt(r["messages"]) for r in load_records("chat")[:16]]
    params = SamplingParams(temperature=0, max_tokens=96)
    ar = [o.token_ids for o in outputs(llm, chats, params, "ar")]
    spec = outputs(llm, chats, params, "mtp", num_speculative_tokens=1)
    assert [o.token_ids for o in spec] == ar
    steps = sum(o.num_draft_steps for o in spec)
    assert 1 + sum(o.num_accepted for o in spec) / steps >= 1.6


def test_training_writes_a_module_the_engine_loads(tmp_path, spec_target):
    from branchwise.train.mtp import train_mtp

    model_dir = tmp_path / "model"
    shutil.copytree(spec_target, model_dir)
    (model_dir / OWN_FILE).unlink()
    info = train_mtp(str(model_dir), minutes=0.2, device="cpu", num_prompts=16, max_tokens=24)
    assert info["steps"] > 0 and (model_dir / OWN_FILE).exists()
    assert json.loads((model_dir / "mtp.json").read_text())["steps"] == info["steps"]
    assert "mtp" in LLM(str(model_dir)).engine.resources


def test_training_with_init_continues_from_the_given_module(tmp_path, spec_target):
    """`--init`: the loop starts from the given weights (at lr 0 they come back unchanged)."""
    from branchwise.train.mtp import train_mtp

    out = tmp_path / "again.safetensors"
    init = f"{spec_target}/{OWN_FILE}"
    train_mtp(spec_target, out, minutes=0.2, device="cpu", num_prompts=8, max_tokens=8, lr=0.0, init=init)
    before, after = load_file(init), load_file(str(out))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
