"""Speculative decoding (draft model, prompt lookup, MTP): lossless greedy and sampled, exact rollback."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from prometheus_client import generate_latest
from scipy.stats import chi2_contingency

from branchwise import LLM, SamplingParams
from branchwise.engine.stats import CostModel, StepStats
from branchwise.strategies import ngram, speculative
from branchwise.strategies.speculative import Acceptance
from branchwise.train.tiny import build_tiny_checkpoint
from branchwise.train.tokenizer import stdlib_files, train_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def target(spec_target) -> str:
    return spec_target


@pytest.fixture(scope="module")
def truncated_draft(spec_target) -> str:
    """The target with its second layer cut off: a draft that agrees often, not always."""
    return spec_target + "/draft"


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory, tokenizer) -> str:
    """Unrelated random weights: acceptance near zero."""
    path = tmp_path_factory.mktemp("random")
    return str(
        build_tiny_checkpoint(path, "llama", tokenizer=tokenizer, hidden_size=32, num_layers=1, seed=9)
    )


@pytest.fixture(scope="module")
def llm_truncated(target, truncated_draft) -> LLM:
    return LLM(target, draft_model=truncated_draft, max_num_batched_tokens=256)


def outputs(llm: LLM, prompts, params, strategy, **strategy_params):
    outs = llm.generate(prompts, params, strategy=strategy, strategy_params=strategy_params or None)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("draft", ["truncated_draft", "random_draft"])
def test_draft_greedy_equals_autoregressive_for_every_k(draft, request, target, prompts):
    llm = LLM(target, draft_model=request.getfixturevalue(draft), max_num_batched_tokens=256)
    ar = [o.token_ids for o in outputs(llm, prompts, GREEDY, "ar")]
    for k in (1, 3, 5):
        spec = outputs(llm, prompts, GREEDY, "draft", num_speculative_tokens=k)
        assert [o.token_ids for o in spec] == ar
        assert all(0 < o.num_drafted <= k * o.num_draft_steps for o in spec)  # fewer near max_tokens
        accepted = [o.num_accepted / o.num_drafted for o in spec]
        if draft == "truncated_draft":  # sequences in one batch accept different numbers of tokens
            assert max(accepted) > 0.3 and max(accepted) - min(accepted) > 0.1
        else:
            assert max(accepted) < 0.2
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_ngram_greedy_equals_autoregressive_for_every_k(tiny_llama, prompts):
    llm = LLM(tiny_llama, max_num_batched_tokens=256)
    ar = [o.token_ids for o in outputs(llm, prompts, GREEDY, "ar")]
    for k in (1, 3, 5):
        spec = outputs(llm, prompts, GREEDY, "ngram", num_speculative_tokens=k)
        assert [o.token_ids for o in spec] == ar
        assert sum(o.num_accepted for o in spec) > 0


def test_strategies_mix_per_request_in_one_batch(llm_truncated, prompts):
    ar = [o.token_ids for o in outputs(llm_truncated, prompts, GREEDY, "ar")]
    engine = llm_truncated.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"mix{i}", p, GREEDY, ["ar", "draft", "ngram", "suffix", "mtp", "medusa"][i % 6])
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for u in engine.step():
            got.setdefault(u.request_id, []).extend(u.token_ids)
    assert [got[f"mix{i}"] for i in range(len(prompts))] == ar


def test_stop_string_and_max_tokens_end_an_accepted_run_exactly(llm_truncated, prompts):
    ar = outputs(llm_truncated, prompts[:4], GREEDY, "ar")
    stops = [o.text[7:10] for o in ar]
    for strategy in ("draft", "ngram", "suffix", "mtp"):
        for p, stop in zip(prompts[:4], stops, strict=True):
            params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop])
            want = outputs(llm_truncated, [p], params, "ar")[0]
            got = outputs(llm_truncated, [p], params, strategy, num_speculative_tokens=5)[0]
            assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
        for n in (1, 2, 7):
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            got = outputs(llm_truncated, prompts[:4], params, strategy, num_speculative_tokens=5)
            assert [o.token_ids for o in got] == [o.token_ids[:n] for o in ar]


def test_logprobs_are_the_target_models(llm_truncated, prompts):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    ar = outputs(llm_truncated, prompts[:3], params, "ar")
    spec = outputs(llm_truncated, prompts[:3], params, "draft", num_speculative_tokens=3)
    for a, s in zip(ar, spec, strict=True):
        assert [e["token_id"] for e in a.logprobs] == [e["token_id"] for e in s.logprobs]
        np.testing.assert_allclose(
            [e["logprob"] for e in s.logprobs], [e["logprob"] for e in a.logprobs], atol=1e-4
        )


@pytest.mark.parametrize("strategy", ["draft", "ngram", "suffix", "mtp"])
def test_sampled_tokens_follow_the_autoregressive_distribution(llm_truncated, strategy):
    assert_sampled_like_ar(llm_truncated, strategy)


def assert_sampled_like_ar(llm: LLM, strategy: str) -> None:
    """Two-sample chi-square on the 2nd and 3rd sampled tokens (the first ones drafts can touch)."""
    # every token id occurs in the prompt, so prompt lookup always finds a 1-gram to draft from
    start = llm.tokenizer.encode("def main(self):\n    return self")
    prompt = np.random.default_rng(0).permutation(llm.engine.vocab_size).tolist() + start
    samples = {}
    for name, first_seed in (("ar", 0), (strategy, 100_000)):  # independent seeds for the two samples
        params = [
            SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True, n=200, seed=first_seed + i * 200)
            for i in range(8)
        ]
        k = {"num_speculative_tokens": 2} if name != "ar" else None
        outs = [c for o in llm.generate([prompt] * 8, params, name, k) for c in o.outputs]
        if name != "ar":
            assert sum(c.num_accepted for c in outs) > 0
            assert sum(c.num_accepted for c in outs) < sum(c.num_drafted for c in outs)
        samples[name] = np.array([c.token_ids for c in outs])
    for pos in (1, 2):
        a, b = samples["ar"][:, pos], samples[strategy][:, pos]
        values, counts = np.unique(np.concatenate([a, b]), return_counts=True)
        common = values[counts >= 20]  # rare tokens pooled into one cell so that every cell is well filled
        table = np.array([[np.sum(x == v) for v in common] + [np.sum(~np.isin(x, common))] for x in (a, b)])
        table = table[:, table.sum(0) > 0]
        assert table.shape[1] >= 3  # a real distribution, not a point mass
        assert chi2_contingency(table).pvalue > 0.001


def test_rollback_leaves_both_caches_as_if_rejected_drafts_never_ran(tiny_llama, prompts):
    """A draft identical to the target, with a repetition penalty only the target applies: drafts get
    rejected, and after every step the draft pool holds exactly the target pool's K/V over the tokens
    it claims (stale K/V of a rejected draft would differ), and no block is held beyond them."""
    llm = LLM(tiny_llama, draft_model=tiny_llama, prefix_cache=False)  # blocks held = blocks used
    engine = llm.engine
    bs = engine.config.block_size
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3)
    ref = outputs(llm, prompts[:4], params, "ar")
    for i, p in enumerate(prompts[:4]):
        engine.add_request(f"r{i}", p, params, "draft", {"num_speculative_tokens": 4})
    target_pool, draft_pool = (pool.flatten(2, 3) for pool in engine.blocks.pools)
    got: dict[str, list[int]] = {}
    spec: dict[str, tuple[int, int]] = {}
    while engine.has_unfinished():
        for u in engine.step():
            got.setdefault(u.request_id, []).extend(u.token_ids)
            spec[u.request_id] = (u.num_drafted, u.num_accepted)
        held = 0
        for seq in engine.scheduler.running:
            assert len(seq.block_table) == -(-seq.num_computed // bs)
            held += len(seq.block_table)
            computed = seq.strategy_state.computed
            assert computed <= seq.num_computed
            slots = engine.blocks.slots(seq, 0, computed)
            assert np.allclose(draft_pool[:, :, slots], target_pool[:, :, slots], atol=1e-5)
        assert engine.blocks.num_free == engine.num_blocks - held
    assert [got[f"r{i}"] for i in range(4)] == [o.token_ids for o in ref]
    assert all(0 < accepted < drafted for drafted, accepted in spec.values())  # rollbacks happened
    assert engine.blocks.num_available == engine.num_blocks


@pytest.mark.parametrize("strategy", ["draft", "ngram"])
def test_first_drafts_are_verified_in_the_prompts_own_forward(tiny_llama, prompts, strategy):
    """As transformers' assisted generation does: the prefill step feeds the prompt and a first chain,
    so a request's first step already commits accepted drafts; a prompt that needs chunks, or whose
    prompt logprobs are asked for, prefills plainly. Greedy tokens equal autoregressive ones throughout."""
    llm = LLM(tiny_llama, draft_model=tiny_llama, max_num_batched_tokens=64)  # the target drafts itself
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    repeated = [p[:6] * 4 for p in prompts[:4]]  # n-gram lookup finds continuations in the prompt
    ar = [o.token_ids for o in outputs(llm, repeated + [prompts[7]], params, "ar")]
    scored = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=1)
    for i, p in enumerate(repeated + [prompts[7]]):
        engine.add_request(f"r{i}", p, scored if i == 3 else params, strategy, {"num_speculative_tokens": 3})
    got: dict[str, list[int]] = {}
    first: dict[str, tuple[int, int]] = {}  # the first step's (new tokens, drafted tokens)
    while engine.has_unfinished():
        for u in engine.step():
            if u.token_ids and u.request_id not in got:
                first[u.request_id] = (len(u.token_ids), u.num_drafted)
            got.setdefault(u.request_id, []).extend(u.token_ids)
    assert [got[f"r{i}"] for i in range(5)] == ar
    assert first["r0"][1] == first["r1"][1] == 3  # drafted after the prompt, verified in its forward
    if strategy == "draft":  # a drafter that is the target: its first chain is accepted whole
        assert first["r0"][0] == first["r1"][0] == 4
    assert first["r3"] == (1, 0)  # prompt logprobs: a plain prefill
    assert first["r4"] == (1, 0)  # 71 tokens > the 64-token budget: chunked, plain
    assert engine.blocks.num_available == engine.num_blocks


def test_ngram_lookup_takes_the_latest_longest_match():
    assert ngram.lookup([5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]
    assert ngram.lookup([4, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # the 3-gram "1 2 3" has no earlier match
    assert ngram.lookup([1, 2, 3, 4], 3) == []
    assert ngram.lookup([7, 7, 7], 5, min_n=2) == [7]


def test_adaptive_k_drafts_at_low_load_and_stops_when_the_forward_is_compute_bound(
    llm_truncated, prompts, monkeypatch
):
    monkeypatch.setattr(speculative, "PLAIN_EVERY", 10**9)
    engine = llm_truncated.engine
    strategy = engine.strategy("ngram")
    # a fresh controller: what earlier tests' steps taught the shared one (its step cost) stays out
    monkeypatch.setattr(strategy, "k", speculative.AdaptiveK("ngram", engine.config.num_speculative_tokens))
    seq = type("S", (), {})  # a stand-in with what lookahead reads
    seq.strategy_state, seq.strategy_params, seq.num_output_tokens, seq.num_tokens = None, {}, 0, 10
    seq.params = SamplingParams(max_tokens=100)
    cost = CostModel()
    for tokens in (1, 8, 64, 256):  # a fixed cost dominates: extra tokens are free
        cost.observe(tokens, 0.010 + 1e-7 * tokens)
    strategy.begin_step(StepStats(step=2, goodput=100.0, per_token=cost.fit()[1]))
    seq.strategy_state = Acceptance(accepted=20.0, step=2)
    assert strategy.lookahead(seq) == engine.config.num_speculative_tokens
    cost = CostModel()
    for tokens in (64, 128, 256, 512):  # every token costs: a step of 64 sequences yields 1000 tok/s
        cost.observe(tokens, 0.001 * tokens)
    strategy.begin_step(StepStats(step=3, goodput=1000.0, per_token=cost.fit()[1]))
    seq.strategy_state = Acceptance(accepted=8.0, rejected=2.0, step=3)
    assert strategy.lookahead(seq) == 0


def _stand_in_seq():
    seq = type("S", (), {})  # what draft_length reads
    seq.strategy_params, seq.num_output_tokens, seq.num_tokens = {}, 0, 10
    seq.params = SamplingParams(max_tokens=100)
    return seq


def _drive(k, samples) -> None:
    """Step an AdaptiveK through steps of (tokens, seconds, drafts?) (a forced plain step never drafts)."""
    last = (0, 0.0)
    for step, (tokens, seconds, drafts) in enumerate(samples, start=1):
        k.begin_step(StepStats(step=step, last_tokens=last[0], last_seconds=last[1], running=Counter(t=4)))
        k.drafting = drafts and not k.plain
        last = (tokens, seconds)


def test_adaptive_k_sets_each_plain_step_against_the_drafting_steps_around_it(monkeypatch):
    """A batch drains while it drafts, so plain steps meet batches unlike most drafting steps': the
    drafting steps right before and after each plain step yield less than it, and the penalty rises,
    although the drafting steps farther away (a fuller batch) yielded far more."""
    monkeypatch.setattr(speculative, "PLAIN_EVERY", 4)  # plain steps 1, 5, 9, 13, ...
    k = speculative.AdaptiveK("t", 8)
    plain, next_to_plain, far = (20, 0.1, True), (10, 0.1, True), (100, 0.1, True)
    samples = [plain if s % 4 == 1 else next_to_plain if s % 4 in (0, 2) else far for s in range(1, 11)]
    _drive(k, samples)
    assert k.penalty == 3.0  # the window of plain steps 1, 5, 9 closed on the pairs around them


def test_adaptive_k_sets_drafting_against_the_steps_where_nobody_chose_to_draft(monkeypatch):
    """No forced plain step comes (K fell to 0 at a full batch, then drafting resumed): the steps where
    nobody drafted are the yardstick, and drafting that yields less is penalised."""
    monkeypatch.setattr(speculative, "PLAIN_EVERY", 10**9)
    k = speculative.AdaptiveK("t", 8)
    _drive(k, [(32, 0.02, False)] * 5 + [(40, 0.05, True), (30, 0.02, False)] * 4)
    assert k.penalty == 3.0


def test_adaptive_k_penalty_stays_low_when_drafting_pays_a_little_under_timing_noise():
    """Drafting steps yield 10 % more than plain steps, each step's rate off by about 30 % (a shared
    machine): the penalty moves with the size of each window's gain or loss, so noisy windows that lose
    do not push it up faster than the winning ones bring it down (a fixed 3x up, 1.5x down did: the
    penalty sat above 2 for 40 % of the steps here)."""
    rng = np.random.default_rng(0)
    k = speculative.AdaptiveK("t", 8)
    last, penalties = (0, 0.0), []
    for step in range(1, 5000):
        k.begin_step(StepStats(step=step, last_tokens=last[0], last_seconds=last[1], running=Counter(t=4)))
        k.drafting = not k.plain
        last = (round(100 * (1.1 if k.drafting else 1.0) * rng.lognormal(0, 0.3)), 0.1)
        penalties.append(k.penalty)
    assert np.median(penalties) < 1.2
    assert np.mean(np.array(penalties) > 2) < 0.2
    # a window that loses by half raises it 3x at most; one that wins by 10 % lowers it by 1.1 ** 2
    k = speculative.AdaptiveK("t", 8)
    _drive(k, [(32, 0.02, False), (16, 0.02, True)] * 6)
    assert k.penalty == 3.0
    k = speculative.AdaptiveK("t", 8)
    k.penalty = 2.0
    _drive(k, [(10, 0.02, False), (11, 0.02, True)] * 6)
    assert k.penalty == pytest.approx(2.0 / 1.1**2)


def test_adaptive_k_drafts_again_once_drafting_pays_after_a_burst_taught_it_otherwise():
    """A burst of load on the machine left the controller with a huge whole-step slope and its highest
    penalty, so no sequence chose to draft. Probe steps still draft; once they yield more than the plain
    steps beside them, the penalty falls back and every step drafts again."""
    k = speculative.AdaptiveK("t", 8)
    ev = Acceptance(accepted=9.0, rejected=1.0, step=1)
    k.penalty = 1e4
    for fed in (1, 40, 2, 60):  # the burst: whole steps that grew 0.1 s per fed token
        k.step_cost.observe(fed, 0.1 * fed)
    last = (0, 0.0, 0)  # the last step's tokens, seconds, tokens fed
    drafted_steps = []
    for step in range(2, 40 * speculative.PLAIN_EVERY):
        stats = StepStats(step=step, goodput=100.0, per_token=1e-4, fixed=0.01, running=Counter(t=1))
        stats.last_tokens, stats.last_seconds, stats.last_fed = last
        k.begin_step(stats)
        kk = k.draft_length(_stand_in_seq(), ev, 1000)
        k.drafting = kk > 0
        drafted_steps.append(kk > 0)
        last = (1 + kk, 0.01, 1 + kk)  # a step of the same time yields every drafted token (all accepted)
    assert drafted_steps[: speculative.PLAIN_EVERY].count(True) == 1  # the probe alone
    assert sum(drafted_steps[-2 * speculative.PLAIN_EVERY :]) == 2 * speculative.PLAIN_EVERY - 2  # not plain


def test_a_drafter_depth_runs_only_where_the_chains_still_going_pay_its_fixed_cost():
    """One drafter forward costs 1.5 ms however few chains it drafts for: in a batch of 32 it pays for
    32 chains that accept most drafts, not for the 2 still going at depth 4. A probe step drafts anyway
    (the drafter's cost is measured only when it runs)."""
    k = speculative.AdaptiveK("t", 8)
    stats = dict(goodput=1000.0, per_token=0.0001, fixed=0.01, running=Counter(t=32))
    k.begin_step(StepStats(step=2, **stats))
    sure = Acceptance(accepted=9.0, rejected=1.0, step=2)
    assert k.depth_pays([sure] * 32, 0, 0.0015, 0.00001)
    assert not k.depth_pays([sure] * 2, 3, 0.0015, 0.00001)
    k.begin_step(StepStats(step=speculative.PLAIN_EVERY // 2 + 1, **stats))
    assert k.probe and k.depth_pays([sure] * 2, 3, 0.0015, 0.00001)
    k.begin_step(StepStats(step=speculative.PLAIN_EVERY + 1, **stats))
    assert k.plain and not k.depth_pays([sure] * 32, 0, 0.0015, 0.00001)


def test_adaptive_k_threshold_follows_a_batch_that_just_filled_up():
    """Right after a batch drained, the smoothed goodput is still a small batch's; what a drafted token
    must beat is what a plain step of the 32 sequences now running yields (by the fitted step cost)."""
    k = speculative.AdaptiveK("t", 8)
    k.begin_step(StepStats(step=5, goodput=100.0, per_token=0.0005, fixed=0.010, running=Counter(t=32)))
    assert k.threshold() == pytest.approx(0.0005 * 32 / (0.010 + 0.0005 * 32))
    ev = Acceptance(accepted=5.0, rejected=5.0, step=5)  # about one token in two accepted
    assert k.draft_length(_stand_in_seq(), ev, 1000) == 0  # by the stale goodput alone: 4 tokens
    k.begin_step(StepStats(step=6, goodput=100.0, per_token=0.0005, fixed=0.010, running=Counter(t=1)))
    assert k.draft_length(_stand_in_seq(), ev, 1000) == 4
    # a fit that found no fixed cost (its slope capped) gives no plain-step estimate, not an infinite one
    k.begin_step(StepStats(step=7, goodput=100.0, per_token=0.0005, fixed=0.0, running=Counter(t=32)))
    assert k.stats.plain_goodput() == 0.0 and k.draft_length(_stand_in_seq(), ev, 1000) == 4


def test_adaptive_k_threshold_follows_a_batch_that_just_drained():
    """32 sequences yielded 3,200 tok/s together, 100 each; when one is left, a drafted token must beat
    what that one yields, not what the 32 did: the straggler drafts at once, not after the smoothed
    goodput has decayed for many plain steps."""
    k = speculative.AdaptiveK("t", 8)
    full = dict(goodput=3200.0, seq_goodput=100.0, per_token=0.0005, fixed=0.0)
    ev = Acceptance(accepted=5.0, rejected=5.0, step=5)  # about one token in two accepted
    k.begin_step(StepStats(step=5, running=Counter(t=32), **full))
    assert k.threshold() == pytest.approx(0.0005 * 3200) and k.draft_length(_stand_in_seq(), ev, 1000) == 0
    k.begin_step(StepStats(step=6, running=Counter(t=1), **full))
    assert k.threshold() == pytest.approx(0.0005 * 100)
    assert k.draft_length(_stand_in_seq(), ev, 1000) == 4  # 0.5^4 > 0.05 > 0.5^5
    # the sequences waiting for admission count: the batch is about to fill again
    k.begin_step(StepStats(step=7, running=Counter(t=1), waiting=31, **full))
    assert k.threshold() == pytest.approx(0.0005 * 3200)


def test_adaptive_k_counts_what_its_whole_steps_cost_per_fed_token():
    """Steps of this strategy that grow by 2 ms per fed token (drafting and verifying on the host) set the
    cost of a drafted token, not the target forward's 0.1 ms alone."""
    k = speculative.AdaptiveK("t", 8)
    for step, fed in enumerate((1, 4, 9, 2, 6, 11, 3), start=2):
        k.begin_step(
            StepStats(
                step=step,
                goodput=100.0,
                per_token=0.0001,
                fixed=0.01,
                last_tokens=fed,
                last_fed=fed,
                last_seconds=0.01 + 0.002 * fed,
                running=Counter(t=1),
            )
        )
        k.drafting = not k.plain
    assert k.threshold() == pytest.approx(0.002 * 100.0, rel=1e-3)


def test_draft_strategy_needs_a_draft_model_of_the_same_vocabulary(tmp_path, tiny_llama, prompts):
    with pytest.raises(ValueError, match="draft model"):
        LLM(tiny_llama).generate(prompts[0], GREEDY, strategy="draft")
    other = train_tokenizer((p.read_text(errors="ignore") for p in stdlib_files(10)), 300)
    mismatched = build_tiny_checkpoint(tmp_path / "other", "llama", tokenizer=other, hidden_size=32)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(tiny_llama, draft_model=str(mismatched))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM(tiny_llama).generate(prompts[0], GREEDY, strategy="ngram", strategy_params={"k": 2})


def test_speculation_metrics_count_drafts_and_accepted_per_position(llm_truncated, prompts):
    from prometheus_client.parser import text_string_to_metric_families

    def counts(name: str) -> dict:
        text = generate_latest(llm_truncated.engine.metrics.registry).decode()
        return {
            s.labels.get("position"): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and s.labels.get("strategy") == "draft"
        }

    per_pos, accepted, drafts = (
        "branchwise:spec_decode_num_accepted_tokens_per_pos_total",
        "branchwise:spec_decode_num_accepted_tokens_total",
        "branchwise:spec_decode_num_drafts_total",
    )
    before = {name: counts(name) for name in (per_pos, accepted, drafts)}
    outs = outputs(llm_truncated, prompts[:4], GREEDY, "draft", num_speculative_tokens=3)
    after = {name: counts(name) for name in (per_pos, accepted, drafts)}
    grown = {n: {k: v - before[n].get(k, 0.0) for k, v in after[n].items()} for n in after}
    assert grown[drafts][None] == sum(o.num_draft_steps for o in outs) > 0
    assert grown[accepted][None] == sum(o.num_accepted for o in outs) > 0
    by_pos = [grown[per_pos].get(str(pos), 0.0) for pos in range(3)]
    assert sum(by_pos) == grown[accepted][None] and by_pos[0] >= by_pos[1] >= by_pos[2] and by_pos[1] > 0
    assert {pos for pos, n in grown[per_pos].items() if n} <= {"0", "1", "2"}  # K = 3: no deeper position


def test_ngram_on_extraction_with_the_demo_model_accepts_more_than_two_tokens_per_step():
    """Event extraction copies long spans of its prompt (names, dates digit by digit)."""
    import random

    from branchwise.models.demo import ASSET_DIR
    from branchwise.train.demo_data import _event

    llm = LLM(str(ASSET_DIR))
    rng = random.Random(3)
    messages = []
    for _ in range(16):
        sentence, fields = _event(rng)
        messages.append(f"{sentence} Extract event, city and date as JSON.")
    prompts = [llm.chat_prompt([{"role": "user", "content": m}]) for m in messages]
    params = SamplingParams(temperature=0, max_tokens=80)
    ar = [o.token_ids for o in outputs(llm, prompts, params, "ar")]
    spec = outputs(llm, prompts, params, "ngram", num_speculative_tokens=8)
    assert [o.token_ids for o in spec] == ar
    steps = sum(o.num_draft_steps for o in spec)
    assert 1 + sum(o.num_accepted for o in spec) / steps > 2


def test_demo_draft_model_is_lossless_and_accepted(prompts):
    from branchwise.models.demo import ASSET_DIR

    llm = LLM()  # the demo model with its own draft model
    assert llm.engine.resources["draft"].path == str(ASSET_DIR / "draft")
    chats = [
        llm.chat_prompt([{"role": "user", "content": m}])
        for m in ("What is (3+4)*(9-2)?", "Compute (15-6)+(8*3).")
    ]
    params = SamplingParams(temperature=0, max_tokens=96)
    ar = [o.token_ids for o in outputs(llm, chats, params, "ar")]
    spec = outputs(llm, chats, params, "draft", num_speculative_tokens=4)
    assert [o.token_ids for o in spec] == ar
    assert sum(o.num_accepted for o in spec) > 0.3 * sum(o.num_drafted for o in spec)
