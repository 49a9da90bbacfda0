"""A failure that belongs to one sequence fails that sequence only; pressure is survived, never failed."""

from __future__ import annotations

import random
import sys

import pytest

from branchwise import LLM, SamplingParams
from branchwise.models.demo import ASSET_DIR
from branchwise.train.demo_data import arithmetic
from branchwise.train.eval import EVAL_SEED

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SEEDED = [SamplingParams(temperature=1.0, seed=s, max_tokens=24, ignore_eos=True) for s in (5, 6)]


@pytest.fixture(scope="module")
def spec_llm(spec_target) -> LLM:
    return LLM(spec_target, max_num_seqs=64)


@pytest.fixture(scope="module")
def demo_llm() -> LLM:
    return LLM(str(ASSET_DIR), max_num_seqs=64)


def arithmetic_chats(llm: LLM, n: int, seed: int = EVAL_SEED) -> list[list[int]]:
    rng = random.Random(seed)
    return [llm.chat_prompt([{"role": "user", "content": arithmetic(rng)[0]}]) for _ in range(n)]


def run(llm: LLM, requests: list[tuple[list[int], SamplingParams]], strategy: str, poison=None) -> dict:
    """Requests added together and stepped to the end; `poison(engine, params, strategy)` breaks one more
    request after its admission. Returns {request id: (token ids, finish reason)}."""
    engine = llm.engine
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params, strategy)
    if poison is not None:
        bad = SamplingParams(temperature=0, max_tokens=24)
        engine.add_request("bad", requests[0][0], bad, strategy)
        poison(engine, bad, strategy)
    out: dict[str, tuple[list[int], str | None]] = {}
    while engine.has_unfinished():
        for u in engine.step():
            tokens, reason = out.get(u.request_id, ([], None))
            out[u.request_id] = (tokens + u.token_ids, u.finish_reason or reason)
    return out


def poison_stop_ids(engine, params: SamplingParams, strategy: str) -> None:
    """Stop ids past the vocabulary with min_tokens, past admission: the sampler raises an IndexError."""
    params.stop_token_ids = [engine.vocab_size + 99]
    params.min_tokens = 2


def poison_propose(engine, params: SamplingParams, strategy: str) -> None:
    """The strategy raises whenever it drafts for a batch that holds the request (its paths included)."""
    target = engine.strategy(strategy)
    propose = type(target).propose

    def broken(seqs, budgets):
        if any(s.params is params for s in seqs):
            raise RuntimeError("poisoned drafter")
        return propose(target, seqs, budgets)

    target.propose = broken


def poison_after_sampling(engine, params: SamplingParams, strategy: str) -> None:
    """The strategy raises after verifying a batch that holds the request: its neighbours' random numbers
    were drawn already, so their retry must start again from the state before."""
    target = engine.strategy(strategy)
    verify = type(target).verify

    def broken(plans, out):
        verdicts = verify(target, plans, out)
        if any(p.seq.params is params for p in plans):
            raise RuntimeError("poisoned verifier")
        return verdicts

    target.verify = broken


def check_neighbours(llm: LLM, requests, strategy: str, poison) -> None:
    alone = [run(llm, [r], strategy)["r0"] for r in requests]
    try:
        together = run(llm, requests, strategy, poison)
    finally:
        llm.engine.strategy(strategy).__dict__.pop("propose", None)
        llm.engine.strategy(strategy).__dict__.pop("verify", None)
    assert together["bad"][1] == "error"
    for i, want in enumerate(alone):
        assert together[f"r{i}"] == want, f"request {i} changed next to a failing one"
    blocks = llm.engine.blocks
    assert blocks.num_available == blocks.num_blocks  # every block is free or idle in the prefix cache


def paths_forked(llm: LLM) -> float:
    families = llm.engine.metrics.registry.collect()
    return sum(s.value for f in families if f.name.endswith("multiverse_paths") for s in f.samples)


@pytest.mark.parametrize(
    "poison", [poison_stop_ids, poison_propose, poison_after_sampling], ids=["sampler", "propose", "verify"]
)
@pytest.mark.parametrize("strategy", ["ar", "draft", "ngram", "mtp", "medusa"])
def test_a_failing_sequence_ends_alone_and_its_neighbours_get_their_solo_tokens(
    spec_llm, prompts, strategy, poison
):
    requests = [(p, GREEDY) for p in prompts[:8]]
    if strategy == "ar":  # seeded sampling too: the retry draws the same random numbers
        requests += [(prompts[8], SEEDED[0]), (prompts[9], SEEDED[1])]
    check_neighbours(spec_llm, requests, strategy, poison)


def test_a_failing_multiverse_request_ends_alone_next_to_forking_ones(demo_llm):
    params = SamplingParams(temperature=0, max_tokens=200)
    requests = [(p, params) for p in arithmetic_chats(demo_llm, 8)]
    before = paths_forked(demo_llm)
    check_neighbours(demo_llm, requests, "multiverse", poison_stop_ids)
    assert paths_forked(demo_llm) > before


def test_multiverse_under_a_tiny_kv_pool_gives_the_tokens_it_gives_without_pressure(demo_llm):
    params = SamplingParams(temperature=0, max_tokens=200)
    chats = arithmetic_chats(demo_llm, 20)
    want = [o.outputs[0].token_ids for o in demo_llm.generate(chats, params, strategy="multiverse")]
    small = LLM(str(ASSET_DIR), num_blocks=32)  # 512 slots for 20 requests that fork up to 8 paths each
    outs = small.generate(chats, params, strategy="multiverse")
    assert [o.outputs[0].finish_reason for o in outs] == ["stop"] * 20
    assert [o.outputs[0].token_ids for o in outs] == want
    assert small.engine.scheduler.num_preemptions > 0  # the paths were swapped out and back
    assert small.engine.blocks.num_available == small.engine.blocks.num_blocks


def test_a_merge_with_no_room_left_waits_swapped_out_and_gives_the_same_tokens(demo_llm, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=200)
    chats = arithmetic_chats(demo_llm, 4, seed=3)
    want = [o.outputs[0].token_ids for o in demo_llm.generate(chats, params, strategy="multiverse")]
    llm = LLM(str(ASSET_DIR))
    can_allocate = llm.engine.blocks.can_allocate
    refused = []

    def no_room_to_merge(seq, num_tokens):
        if sys._getframe(1).f_code.co_name == "adopt_kv":
            refused.append(seq.request_id)
            return False
        return can_allocate(seq, num_tokens)

    monkeypatch.setattr(llm.engine.blocks, "can_allocate", no_room_to_merge)
    outs = llm.generate(chats, params, strategy="multiverse")
    assert refused  # every merge went through the swapped-out path
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.blocks.num_available == llm.engine.blocks.num_blocks


def test_a_temperature_below_1e_5_is_greedy_and_penalties_stay_in_range(spec_llm, prompts):
    greedy = spec_llm.generate(prompts[:3], GREEDY)
    tiny = SamplingParams(temperature=1e-320, max_tokens=24, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in spec_llm.generate(prompts[:3], tiny)] == [
        o.outputs[0].token_ids for o in greedy
    ]
    for bad in (
        dict(repetition_penalty=1e-300),
        dict(repetition_penalty=1e9),
        dict(temperature=float("nan")),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_paths_that_outgrow_the_whole_cache_fail_their_request_alone_instead_of_hanging(demo_llm):
    chats = arithmetic_chats(demo_llm, 5)  # the fifth forks paths longer than 8 blocks hold
    params = SamplingParams(temperature=0, max_tokens=None)
    want = [o.outputs[0].token_ids for o in demo_llm.generate(chats, params, strategy="multiverse")]
    llm = LLM(str(ASSET_DIR), num_blocks=8)
    outs = llm.generate(chats, params, strategy="multiverse")
    assert [o.outputs[0].finish_reason for o in outs] == ["stop"] * 4 + ["error"]
    assert "more KV blocks than the whole cache holds" in outs[4].usage["error"]
    assert [o.outputs[0].token_ids for o in outs[:4]] == want[:4]
    assert llm.engine.blocks.num_available == llm.engine.blocks.num_blocks
