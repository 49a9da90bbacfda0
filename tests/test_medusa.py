"""Medusa heads with tree attention: trees from choices, lossless greedy, the authors' weight layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from prometheus_client import generate_latest
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from branchwise import LLM, SamplingParams
from branchwise.models.medusa import MedusaHeads, find_heads, load_heads, save_heads, stack_heads
from branchwise.strategies.medusa import build_tree, check_choices

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def outputs(llm: LLM, prompts, params, strategy, **strategy_params):
    outs = llm.generate(prompts, params, strategy=strategy, strategy_params=strategy_params or None)
    return [o.outputs[0] for o in outs]


@pytest.fixture(scope="module")
def random_heads_target(tmp_path_factory, spec_target) -> str:
    """The speculative target with random Medusa heads: acceptance near zero."""
    path = tmp_path_factory.mktemp("random_heads")
    shutil.copytree(spec_target, path, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(spec_target)
    torch.manual_seed(3)
    heads = MedusaHeads(model.config.hidden_size, model.config.vocab_size, 4, 2)
    for p in heads.parameters():
        p.data.normal_(0, 0.2)
    shutil.rmtree(path / "medusa")
    save_heads(heads, path / "medusa", spec_target)
    return str(path)


def test_tree_from_a_hand_checked_choice_list():
    choices = check_choices([[1], [0, 0, 0], [0], [0, 1], [0, 0]], num_heads=3)
    assert choices == ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    tree = build_tree(tuple(sorted(choices)))
    # index: 0 root, 1 (0,), 2 (0,0), 3 (0,0,0), 4 (0,1), 5 (1,)
    assert tree.depth.tolist() == [0, 1, 2, 3, 2, 1]
    assert tree.parent == (-1, 0, 1, 2, 1, 0)
    assert tree.paths == ((1, 2, 3), (1, 4), (5,))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.mask, expected)


@pytest.mark.parametrize(
    "choices, message",
    [
        ([[0, 1]], "no parent"),
        ([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], "deeper than"),
        ([[0], [-1]], "ranks in"),
        ([], "list of 1 to"),
    ],
)
def test_bad_choice_lists_are_refused(choices, message):
    with pytest.raises(ValueError, match=message):
        check_choices(choices, num_heads=3)


@pytest.mark.parametrize("which", ["spec_target", "random_heads_target"])
def test_medusa_greedy_equals_autoregressive(which, request, prompts):
    llm = LLM(request.getfixturevalue(which), max_num_batched_tokens=256)
    assert "medusa" in llm.engine.resources
    ar = [o.token_ids for o in outputs(llm, prompts, GREEDY, "ar")]
    adaptive = outputs(llm, prompts, GREEDY, "medusa")
    assert [o.token_ids for o in adaptive] == ar
    pinned = outputs(llm, prompts, GREEDY, "medusa", choices=[[0], [1], [0, 0], [1, 0], [0, 0, 0], [2]])
    assert [o.token_ids for o in pinned] == ar
    assert all(o.num_draft_steps > 0 for o in pinned)
    accepted = sum(o.num_accepted for o in pinned) / sum(o.num_draft_steps for o in pinned)
    assert accepted < 0.2  # trained heads (test_demo_heads_...) accept far more; exactness must not care
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_medusa_is_exact_under_preemption_penalties_and_a_small_cache(spec_target, prompts):
    """Few blocks force preemption (the heads' hidden state is dropped with the K/V); penalties take the
    per-path verification."""
    llm = LLM(spec_target, num_blocks=24, block_size=8, max_num_batched_tokens=64, prefix_cache=False)
    for params in (GREEDY, SamplingParams(temperature=0, max_tokens=32, repetition_penalty=1.3)):
        ar = [o.token_ids for o in outputs(llm, prompts[:8], params, "ar")]
        medusa = outputs(llm, prompts[:8], params, "medusa", choices=[[0], [0, 0], [1], [0, 0, 0]])
        assert [o.token_ids for o in medusa] == ar
    assert llm.engine.metrics.preemptions.labels(llm.engine.model_name)._value.get() > 0
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_sampled_requests_use_typical_acceptance_and_end_cleanly(spec_target, prompts):
    llm = LLM(spec_target, max_num_batched_tokens=256)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=1, logprobs=2)
    typical = dict(posterior_threshold=0.05, posterior_alpha=0.2, choices=[[0], [1], [0, 0], [0, 0, 0]])
    outs = outputs(llm, prompts[:6], params, "medusa", **typical)
    assert all(len(o.token_ids) == 24 and len(o.logprobs) == 24 for o in outs)
    assert sum(o.num_accepted for o in outs) > 0
    # seeded and with a fixed tree, reproducible (an adaptive tree changes how many uniforms a step draws)
    again = outputs(llm, prompts[:6], params, "medusa", **typical)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    with pytest.raises(ValueError, match="posterior_alpha"):
        llm.generate(prompts[:1], params, strategy="medusa", strategy_params={"posterior_alpha": 2})
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_tree_acceptance_metrics_by_depth_and_rank(spec_target, prompts):
    llm = LLM(spec_target)
    outs = outputs(llm, prompts, GREEDY, "medusa", choices=[[0], [1], [0, 0], [0, 0, 0]])
    text = generate_latest(llm.engine.metrics.registry).decode()
    assert 'spec_decode_tree_proposed_tokens_total{depth="3"' in text

    def total(counter) -> float:
        return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))

    assert total(llm.engine.metrics.tree_proposed) == sum(o.num_drafted for o in outs)
    assert total(llm.engine.metrics.tree_accepted) == sum(o.num_accepted for o in outs) > 0


def test_heads_load_from_the_authors_layout(tmp_path, spec_target):
    """Keys as the Medusa authors save them ({head}.{layer}.linear.*, {head}.{num_layers}.weight), as
    safetensors and as .pt, beside their config.json."""
    model = AutoModelForCausalLM.from_pretrained(spec_target)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    torch.manual_seed(0)
    state = {}
    for h in range(2):
        for layer in range(2):
            state[f"{h}.{layer}.linear.weight"] = torch.randn(hidden, hidden) * 0.1
            state[f"{h}.{layer}.linear.bias"] = torch.randn(hidden) * 0.1
        state[f"{h}.2.weight"] = torch.randn(vocab, hidden) * 0.1
    config = {"medusa_num_heads": 2, "medusa_num_layers": 2, "base_model_name_or_path": "x"}
    x = torch.randn(3, hidden)
    expected = []
    for h in range(2):
        y = x
        for layer in range(2):
            w, b = state[f"{h}.{layer}.linear.weight"], state[f"{h}.{layer}.linear.bias"]
            y = y + torch.nn.functional.silu(y @ w.T + b)
        expected.append(y @ state[f"{h}.2.weight"].T)
    for name in ("medusa_lm_head.safetensors", "medusa_lm_head.pt"):
        folder = tmp_path / name.split(".")[1]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        if name.endswith(".pt"):
            torch.save(state, folder / name)
        else:
            save_file(state, str(folder / name))
        assert find_heads(spec_target, str(folder)) == str(folder)
        heads = load_heads(str(folder), model)
        assert heads.num_heads == 2 and heads.num_layers == 2
        torch.testing.assert_close(heads(x), torch.stack(expected), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="holds no Medusa heads"):
        find_heads(spec_target, str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(
        {
            "0.0.linear.weight": torch.zeros(4, 4),
            "0.0.linear.bias": torch.zeros(4),
            "0.1.weight": torch.zeros(7, 4),
        },
        str(bad / "medusa_lm_head.safetensors"),
    )
    with pytest.raises(ValueError, match="do not fit this model"):
        load_heads(str(bad), model)


def test_stacked_heads_give_the_modules_logits_and_share_its_weights():
    torch.manual_seed(0)
    heads = MedusaHeads(32, 50, 3, 2).eval().requires_grad_(False)
    for p in heads.parameters():
        p.data.normal_(0, 0.3)
    hidden = torch.randn(5, 32)
    expected = heads(hidden)
    forward = stack_heads(heads)
    torch.testing.assert_close(forward(hidden), expected)
    torch.testing.assert_close(forward(hidden[2:3]), expected[:, 2:3])
    torch.testing.assert_close(heads(hidden), expected)  # the module still runs, on views of the stack
    projections = [head[2].weight for head in heads.heads]
    assert projections[1].data_ptr() == projections[0].data_ptr() + 50 * 32 * projections[0].element_size()


def test_medusa_needs_heads(tiny_llama, prompts):
    llm = LLM(tiny_llama)
    with pytest.raises(ValueError, match="needs Medusa heads"):
        llm.generate(prompts[:1], GREEDY, strategy="medusa")


def test_demo_heads_are_lossless_and_accept_two_tokens_per_step():
    """The shipped heads on held-out chat prompts (benchmarks/data/chat.jsonl, another seed than their
    training prompts)."""
    from branchwise.bench.datasets import load_records

    llm = LLM("demo")
    prompts = [llm.chat_prompt(r["messages"]) for r in load_records("chat")[:16]]
    params = SamplingParams(temperature=0, max_tokens=96)
    ar = [o.token_ids for o in outputs(llm, prompts, params, "ar")]
    medusa = outputs(llm, prompts, params, "medusa")
    assert [o.token_ids for o in medusa] == ar
    steps = sum(o.num_draft_steps for o in medusa)
    mean_accepted_length = 1 + sum(o.num_accepted for o in medusa) / steps
    assert mean_accepted_length >= 2.0
    stops = [llm.tokenizer.decode(o)[9:12] for o in ar[:4]]
    for prompt, stop in zip(prompts, stops, strict=False):  # inside an accepted run
        params = SamplingParams(temperature=0, max_tokens=96, stop=[stop])
        got, ref = (outputs(llm, [prompt], params, s)[0] for s in ("medusa", "ar"))
        assert (got.text, got.token_ids, got.finish_reason) == (ref.text, ref.token_ids, "stop")
    for n in (1, 2, 7):
        got = outputs(llm, prompts[:4], SamplingParams(temperature=0, max_tokens=n), "medusa")
        assert [o.token_ids for o in got] == [a[:n] for a in ar[:4]]


def test_training_writes_heads_in_the_authors_layout(tmp_path, spec_target):
    from branchwise.train.medusa import train_medusa

    model_dir = tmp_path / "model"
    shutil.copytree(spec_target, model_dir)
    shutil.rmtree(model_dir / "medusa")
    info = train_medusa(str(model_dir), minutes=0.3, device="cpu", num_heads=2, num_prompts=16, max_tokens=24)
    folder = model_dir / "medusa"
    assert json.loads((folder / "config.json").read_text())["medusa_num_heads"] == 2
    assert info["steps"] > 0 and len(info["held_out_top1_agreement"]) == 2
    llm = LLM(str(model_dir))
    assert llm.engine.resources["medusa"].weights[0].num_heads == 2


def test_training_with_init_continues_from_the_given_heads(tmp_path, spec_target):
    """`--init`: the loop starts from the given heads, their count and depth (at lr 0 they come back)."""
    from safetensors.torch import load_file

    from branchwise.train.medusa import train_medusa

    init, out = f"{spec_target}/medusa", tmp_path / "heads"
    info = train_medusa(
        spec_target, out, minutes=0.2, device="cpu", num_prompts=8, max_tokens=8, lr=0.0, init=init
    )
    assert info["num_heads"] == 3
    before, after = (
        load_file(f"{init}/medusa_lm_head.safetensors"),
        load_file(str(out / "medusa_lm_head.safetensors")),
    )
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_tree_after_a_forced_run_is_fed_as_a_trunk_then_the_tree():
    from branchwise.engine.sequence import Sequence
    from branchwise.strategies.tree import path_verdict, tree_plan

    seq = Sequence(0, "r", 0, [5, 6, 7, 8, 9], 2, GREEDY, "medusa", torch.Generator(), num_computed=2)
    tree = build_tree(((0,), (1,), (0, 0)))  # root, two children, a grandchild under the first
    plan = tree_plan(seq, [20, 21, 22], tree)
    assert plan.tokens == [7, 8, 9, 20, 21, 22] and plan.num_logits == 4
    assert plan.positions == [2, 3, 4, 5, 5, 6]  # the trunk, the root (9), then the tree by depth
    expected = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 1, 0],
        [1, 1, 1, 1, 0, 1],
    ]
    assert plan.mask.int().tolist() == expected
    verdict = path_verdict(plan, 10, (1, 3), 30)  # the grandchild's path accepted, then 30
    assert verdict.tokens == [20, 22, 30] and verdict.logit_rows == [10, 11, 13]
    assert verdict.kv_keep == [0, 1, 2, 3, 5]  # the trunk, the root and the path, in sequence order


def test_forced_runs_go_on_with_the_heads_they_left_instead_of_a_plain_step(monkeypatch):
    """A grammar's forced run after the sampled token used to be fed alone in a plain step; now the tree
    follows it (head f + d at depth d). Greedy output stays the autoregressive one, with fewer steps."""
    from branchwise.bench.datasets import load_records
    from branchwise.constraints import Constraint
    from branchwise.strategies.medusa import MedusaStrategy

    llm = LLM("demo")
    records = load_records("extraction")[:12]
    prompts = [llm.chat_prompt(r["messages"]) for r in records]
    params = [
        SamplingParams(temperature=0, max_tokens=96, constraint=Constraint.json_schema(r["schema"]))
        for r in records
    ]
    choices = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]
    trunks = []
    propose = MedusaStrategy.propose

    def recorded(self, seqs, budgets):
        plans = propose(self, seqs, budgets)
        for p in plans:
            if p.payload is not None:  # the heads read the hidden state that scored the first fed token
                assert p.seq.strategy_state.at == p.start
                trunks.append(len(p.tokens) - p.num_logits)
        return plans

    monkeypatch.setattr(MedusaStrategy, "propose", recorded)
    ar = outputs(llm, prompts, params, "ar")
    results = {}
    for past_pending in (False, True):
        monkeypatch.setattr(MedusaStrategy, "drafts_past_pending", past_pending)
        trunks.clear()
        steps = llm.engine.num_steps
        got = [
            outputs(llm, [x], [y], "medusa", choices=choices)[0] for x, y in zip(prompts, params, strict=True)
        ]
        assert [o.token_ids for o in got] == [o.token_ids for o in ar]
        assert all(json.loads(o.text) is not None for o in got)
        results[past_pending] = (llm.engine.num_steps - steps, max(trunks, default=0))
    assert sum(o.num_forced for o in ar) > 0
    (before, no_trunk), (after, trunk) = results[False], results[True]
    assert no_trunk == 0 and trunk > 0
    assert after < before, results
    sampled = SamplingParams(temperature=0.7, seed=3, max_tokens=96, constraint=params[0].constraint)
    out = outputs(llm, prompts[:4], [sampled] * 4, "medusa", choices=choices)
    assert all(json.loads(o.text) is not None for o in out)
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_heads_draft_only_from_the_hidden_state_of_the_first_pending_token():
    """A forced run fed in chunks (a full token budget) leaves the hidden state of a token before the
    first pending one: no tree until a forward with logits refreshes it."""
    from branchwise.engine.sequence import Sequence
    from branchwise.strategies.medusa import MedusaState

    llm = LLM("demo")
    medusa = llm.engine.strategy("medusa")
    medusa.begin_step(llm.engine.stats)
    seq = Sequence(0, "r", 0, list(range(10, 20)), 6, GREEDY, "medusa", torch.Generator(), num_computed=8)
    seq.strategy_params = {"choices": ((0,), (0, 0), (0, 0, 0))}
    seq.strategy_state = MedusaState(torch.zeros(llm.engine.model.config.hidden_size), at=8)
    assert medusa.lookahead(seq) == 3  # two pending: the second covers head 1, heads 2-4 guess on
    seq.strategy_state.at = 7  # it scored the token before: the chunk that fed token 7 had no logits
    assert medusa.lookahead(seq) == 0


def test_grammar_greedy_tree_verification_gives_the_path_by_path_verdicts(monkeypatch):
    """Constrained greedy trees are verified from the target's own argmax, masking only rows where the
    grammar forbids it: every verdict equals the one of every path verified as a masked chain, on schemas
    the model follows and on a regex it does not (most rows masked), and the tokens are `ar`'s."""
    from branchwise.bench.datasets import load_records
    from branchwise.constraints import Constraint
    from branchwise.strategies import tree

    llm = LLM("demo")
    records = load_records("extraction")[:6]
    prompts = [llm.chat_prompt(r["messages"]) for r in records]
    regex = Constraint("regex", "[a-z]{2,6}( [0-9]{1,3}[a-z]{1,4}){3,20}")
    params = [
        SamplingParams(temperature=0, max_tokens=64, constraint=Constraint.json_schema(r["schema"]))
        for r in records
    ] + [SamplingParams(temperature=0, max_tokens=48, constraint=regex)] * 3
    prompts += prompts[:3]
    counts = {"verdicts": 0, "masked_rows": 0}
    fast, mask = tree.verify_grammar_greedy, tree.apply_bitmask

    def checked(ctx, plans, idx, trees, out):
        got = fast(ctx, plans, idx, trees, out)
        want = tree._verify_paths_longest(ctx, plans, idx, trees, out)
        assert [(v.tokens, v.logit_rows, v.kv_keep) for v in got] == [
            (v.tokens, v.logit_rows, v.kv_keep) for v in want
        ]
        counts["verdicts"] += len(got)
        return got

    def counted(logits, bitmask):
        counts["masked_rows"] += 1
        return mask(logits, bitmask)

    monkeypatch.setattr(tree, "verify_grammar_greedy", checked)
    monkeypatch.setattr(tree, "apply_bitmask", counted)
    ar = outputs(llm, prompts, params, "ar")
    got = outputs(llm, prompts, params, "medusa")
    assert [o.token_ids for o in got] == [o.token_ids for o in ar]
    assert counts["verdicts"] > 50 and counts["masked_rows"] > 10, counts
    assert llm.engine.blocks.num_available == llm.engine.num_blocks
