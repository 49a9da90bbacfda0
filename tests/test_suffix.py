"""Suffix decoding: trees drafted from the sequence's own tokens and earlier outputs, exact in every mode."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from branchwise import LLM, SamplingParams
from branchwise.constraints import Constraint
from branchwise.strategies.suffix import DEFAULTS, Prompt, SuffixCache, speculate

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
FIXED = {"num_speculative_tokens": 24}  # no cost rule: what is drafted does not depend on timing


def outputs(llm: LLM, prompts, params, strategy, **strategy_params):
    outs = llm.generate(prompts, params, strategy=strategy, strategy_params=strategy_params or None)
    return [o.outputs[0] for o in outs]


def prompt_of(tokens: list[int]) -> Prompt:
    p = Prompt()
    p.update(tokens)
    return p


def test_a_tree_of_what_followed_earlier_occurrences_hand_checked():
    # "1 2 3" occurred twice before the end, followed by 4 5 and 4 6: 4 is sure, 5 and 6 are even
    p = prompt_of([1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 6, 1, 2, 3])
    tree = speculate([p], p.tokens, dict(DEFAULTS), 0.1, True, 20)
    assert (tree.tokens, tree.parents, tree.score, tree.match_len) == ([4, 5, 6], [0, 1, 1], 2.0, 3)
    chain = speculate([p], p.tokens, dict(DEFAULTS), 0.1, False, 20)
    assert (chain.tokens, chain.parents) == ([4, 5, 9], [0, 1, 2])  # the first of equals at each depth
    # max_spec_factor 1: a 3-token match drafts at most 3 nodes; min_token_prob cuts the even branches
    assert speculate([p], p.tokens, dict(DEFAULTS), 0.6, True, 20).tokens == [4]
    assert speculate([p], p.tokens, dict(DEFAULTS), 0.1, True, 1).tokens == [4]  # no deeper than 1


def test_the_global_cache_drafts_from_earlier_outputs_and_stays_within_its_bound():
    cache = SuffixCache(max_requests=7, max_tokens=1000)
    rng = np.random.default_rng(0)
    outputs_added = []
    for _ in range(400):
        out = rng.integers(0, 5000, size=int(rng.integers(1, 300))).tolist()
        cache.add(out)
        outputs_added.append(out)
        assert len(cache.outputs) <= 7 and cache.num_tokens <= 1000 and len(cache.ring) <= 1000
        assert cache.stored <= 2 * max(cache.num_tokens, 1024)
    latest = outputs_added[-1]
    ctx = prompt_of([77777, *latest[:5]])
    draft = speculate([ctx, cache], ctx.tokens, dict(DEFAULTS), 0.1, True, 24)
    assert draft.tokens == latest[5:10]  # a 5-token match drafts 5
    gone = outputs_added[-40]  # long evicted
    ctx = prompt_of([77777, *gone[:5]])
    assert speculate([cache], ctx.tokens, dict(DEFAULTS), 0.1, True, 24).tokens != gone[5:10]


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, max_num_batched_tokens=256)


def add_decoys(strategy, outs: list[list[int]]) -> None:
    """Cache each output and, twice, copies that leave it after a few tokens: the drafts branch there, and
    the wrong branch ranks first."""
    for out in outs:
        strategy.cache.add(out)
        for cut in (4, 12):
            decoy = out[:cut] + [(t + 1) % 512 for t in out[cut : cut + 12]]
            strategy.cache.add(decoy)
            strategy.cache.add(decoy)


def recording_trees(strategy) -> list:
    propose, trees = strategy.propose, []

    def recording(seqs, budgets):
        plans = propose(seqs, budgets)
        trees.extend(p for p in plans if p.payload is not None)
        return plans

    strategy.propose = recording
    return trees


def test_suffix_greedy_equals_autoregressive_with_trees_penalties_and_preemption(llm, tiny_llama, prompts):
    ar = [o.token_ids for o in outputs(llm, prompts, GREEDY, "ar")]
    assert [o.token_ids for o in outputs(llm, prompts, GREEDY, "suffix")] == ar  # adaptive, cold cache
    strategy = llm.engine.strategy("suffix")
    add_decoys(strategy, ar)
    trees = recording_trees(strategy)
    got = outputs(llm, prompts, GREEDY, "suffix", **FIXED)
    assert [o.token_ids for o in got] == ar
    assert sum(len(t.payload.paths) > 1 for t in trees) >= len(prompts)  # branching trees were verified
    assert sum(o.num_accepted for o in got) > 0.5 * sum(len(o.token_ids) for o in got)
    penalized = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3)
    want = [o.token_ids for o in outputs(llm, prompts[:6], penalized, "ar")]
    add_decoys(strategy, want)
    trees.clear()
    assert [o.token_ids for o in outputs(llm, prompts[:6], penalized, "suffix", **FIXED)] == want
    assert any(len(t.payload.paths) > 1 for t in trees)  # verified path by path (the penalty)
    tight = LLM(tiny_llama, num_blocks=12, max_num_batched_tokens=256)  # forces preemption
    add_decoys(tight.engine.strategy("suffix"), ar)
    assert [o.token_ids for o in outputs(tight, prompts, GREEDY, "suffix", **FIXED)] == ar
    assert tight.engine.metrics.preemptions.labels(tight.engine.model_name)._value.get() > 0
    assert tight.engine.blocks.num_available == tight.engine.num_blocks


def test_suffix_under_a_json_schema_is_valid_and_equals_autoregressive(llm, prompts):
    schema = {
        "type": "object",
        "properties": {"a": {"type": "array", "items": {"enum": ["x", "yy", "x y"]}, "maxItems": 6}},
        "required": ["a"],
    }
    params = SamplingParams(temperature=0, max_tokens=200, constraint=Constraint.json_schema(schema))
    ar = outputs(llm, prompts[:4], params, "ar")
    got = outputs(llm, prompts[:4], params, "suffix", **FIXED)
    assert [o.token_ids for o in got] == [o.token_ids for o in ar]
    assert sum(o.num_accepted for o in got) > 0
    for o in got:
        assert o.finish_reason == "length" or isinstance(json.loads(o.text)["a"], list)
    assert any(o.finish_reason == "stop" for o in got)


def test_a_second_identical_request_drafts_from_the_first_ones_output(tiny_llama, prompts):
    llm = LLM(tiny_llama, max_num_batched_tokens=256)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompt = prompts[3]
    first = outputs(llm, [prompt], params, "suffix", **FIXED)[0]
    second = outputs(llm, [prompt], params, "suffix", **FIXED)[0]
    assert second.token_ids == first.token_ids == outputs(llm, [prompt], params, "ar")[0].token_ids
    length = 1 + second.num_accepted / second.num_draft_steps  # tokens per target step
    assert length >= 4 and length > 1 + first.num_accepted / max(first.num_draft_steps, 1)
    cold = LLM(tiny_llama, max_num_batched_tokens=256, suffix_max_cached_requests=0)  # no global cache
    outputs(cold, [prompt], params, "suffix", **FIXED)
    again = outputs(cold, [prompt], params, "suffix", **FIXED)[0]
    assert again.num_accepted == first.num_accepted


def test_suffix_params_are_checked():
    from branchwise.strategies.suffix import SuffixStrategy

    check = SuffixStrategy.parse_params
    for bad in ({"min_token_prob": 2}, {"max_tree_depth": 1}, {"num_speculative_tokens": 65}, {"k": 1}):
        with pytest.raises(ValueError):
            check(None, bad)
    assert check(None, {"max_spec_factor": 2.5}) == {"max_spec_factor": 2.5}


def test_a_sequence_whose_suffix_drafts_keep_failing_is_not_searched_until_its_evidence_fades(
    tiny_llama, monkeypatch
):
    """Counts are overconfident (a continuation seen once has probability 1): the cost rule weighs a node
    d deep by alpha^d, alpha the sequence's per-token acceptance. With every draft rejected at once no node
    can pass, and the search (host time whatever it finds) is skipped; with long accepted runs the same
    context drafts deep; 40 steps later the bad evidence has faded towards the prior and it searches again,
    drafting only as deep as alpha^d stays above the cost."""
    from branchwise.engine.stats import CostModel, StepStats
    from branchwise.strategies import speculative, suffix
    from branchwise.strategies.suffix import SuffixState

    monkeypatch.setattr(speculative, "PLAIN_EVERY", 10**9)
    strategy = LLM(tiny_llama).engine.strategy("suffix")
    strategy.k = speculative.AdaptiveK("suffix", suffix.MAX_NODES)
    searched = []
    monkeypatch.setattr(suffix, "speculate", lambda *a: searched.append(1) or speculate(*a))
    cost = CostModel()
    for tokens in (8, 16, 32, 64):
        cost.observe(tokens, 0.001 * tokens)
    seq = type("S", (), {})  # a stand-in with what the suffix strategy reads
    seq.token_ids = [1, 2, 3, 4, 5, 6, 7, 8] * 4 + [1, 2, 3]  # "4 5 6 ..." followed every earlier "1 2 3"
    seq.num_tokens, seq.num_output_tokens, seq.strategy_params = len(seq.token_ids), 0, {}
    seq.params = SamplingParams(temperature=0, max_tokens=100)

    def drafted(step: int, accepted: float, rejected: float, seen: int) -> int:
        strategy.begin_step(StepStats(step=step, goodput=300.0, per_token=cost.fit()[1]))
        seq.strategy_state = SuffixState(accepted=accepted, rejected=rejected, step=seen)
        return strategy.lookahead(seq)

    assert drafted(2, accepted=40.0, rejected=1.0, seen=2) >= 8 and len(searched) == 1
    assert strategy.k.threshold() == pytest.approx(0.3)  # a weighted node must be likelier than 0.3
    assert drafted(3, accepted=0.0, rejected=20.0, seen=3) == 0 and len(searched) == 1
    assert drafted(43, accepted=0.0, rejected=20.0, seen=3) >= 1 and len(searched) == 2
    alpha = strategy.k.acceptance(seq.strategy_state)
    assert 0.3 < alpha < 0.9
    assert len(seq.strategy_state.draft.tokens) == max(d for d in range(1, 20) if alpha**d > 0.3)


def test_a_steps_cost_counts_the_search_for_drafts_made_while_scheduling(tiny_llama, prompts, monkeypatch):
    """Suffix and n-gram drafts are searched when the scheduler sizes each sequence's step: that host time
    is part of what a drafting step costs the controller."""
    llm = LLM(tiny_llama)
    engine = llm.engine
    strategy = engine.strategy("suffix")
    lookahead = strategy.lookahead

    def slow_lookahead(seq):
        time.sleep(0.05)
        return lookahead(seq)

    monkeypatch.setattr(strategy, "lookahead", slow_lookahead)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", prompts[0], params, "suffix")
    engine.step()  # the prefill
    engine.step()
    assert engine.stats.last_seconds >= 0.05
