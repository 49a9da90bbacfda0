"""Async scheduling: step n+1 is launched before step n's tokens are read, and lands on the same tokens."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import openai
import pytest
from pydantic import ValidationError
from test_server import read_stream, running_server, wait_until_free

from branchwise import LLM, SamplingParams
from branchwise.config import EngineConfig
from branchwise.constraints import Constraint
from branchwise.engine import detokenizer

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def run(llm: LLM, requests: list[tuple], abort_after: dict[int, int] | None = None) -> dict:
    """Each request's (token ids, text, finish reason, output tokens counted) from stepping the engine by
    hand; a request in `abort_after` is aborted once the client has seen that many of its tokens."""
    engine, abort_after = llm.engine, dict(abort_after or {})
    for i, (prompt, params, strategy) in enumerate(requests):
        engine.add_request(str(i), prompt, params, strategy)
    tokens: dict[tuple[str, int], list[int]] = {}
    texts: dict[tuple[str, int], str] = {}
    reasons: dict[tuple[str, int], str] = {}
    counts: dict[tuple[str, int], int] = {}
    while engine.has_unfinished():
        for u in engine.step():
            key = (u.request_id, u.index)
            tokens.setdefault(key, []).extend(u.token_ids)
            texts[key] = texts.get(key, "") + u.text
            if u.finish_reason:
                reasons[key], counts[key] = u.finish_reason, u.num_output_tokens  # the client's usage
            seen = abort_after.get(int(u.request_id))
            if seen is not None and len(tokens[key]) >= seen and not u.finish_reason:
                engine.abort_request(u.request_id)
                del abort_after[int(u.request_id)]
    outputs = {k: (tokens[k], texts[k], reasons[k], counts[k]) for k in sorted(tokens)}
    assert all(len(t) == n for t, _, _, n in outputs.values())
    return outputs


def both(path: str, **config) -> tuple[LLM, LLM]:
    return LLM(path, **config), LLM(path, async_scheduling=True, **config)


def assert_all_blocks_back(llm: LLM) -> None:
    engine = llm.engine
    assert engine.blocks.num_available == engine.num_blocks
    assert engine._in_flight is None and not engine._requests


def test_async_scheduling_gives_the_tokens_of_synchronous_stepping(spec_target, prompts):
    sync, pipelined = both(spec_target, max_num_batched_tokens=64)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full, other = sync.generate([prompts[4], prompts[9]], greedy)
    stop = full.outputs[0].text[10:13]
    requests = [
        (prompts[0], greedy, "ar"),
        (
            prompts[1],
            SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True),
            "ar",
        ),
        (prompts[4], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]), "ar"),
        (prompts[3], SamplingParams(temperature=0, max_tokens=1), "ar"),  # ends at its first token
        (prompts[5], SamplingParams(n=3, temperature=0.8, seed=3, max_tokens=17, ignore_eos=True), "ar"),
        (
            prompts[6],
            SamplingParams(temperature=0, max_tokens=40, constraint=Constraint.json_schema(SCHEMA)),
            "ar",
        ),
        (prompts[7], SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True), "ar"),
        (
            prompts[8],
            SamplingParams(temperature=0, max_tokens=20, presence_penalty=1.0, ignore_eos=True),
            "ar",
        ),
        (
            prompts[9],
            SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[other.outputs[0].token_ids[5]]),
            "ar",
        ),
        (prompts[10], greedy, "draft"),
        (prompts[11], greedy, "ngram"),
        # speculative strategies stay synchronous; greedy only: a sampled speculative output depends on how
        # many tokens the (timing-driven) controller drafted, in any mode
        (prompts[12], SamplingParams(temperature=0, max_tokens=25), "draft"),
    ]
    want = run(sync, requests)
    got = run(pipelined, requests)
    assert got == want
    assert want[("2", 0)][2] == "stop" and stop not in want[("2", 0)][1]
    assert want[("3", 0)][2] == "length" and len(want[("3", 0)][0]) == 1
    assert want[("8", 0)][2] == "stop" and len(want[("8", 0)][0]) <= 6  # on its stop token id
    assert pipelined.engine.num_deferred > 0 and sync.engine.num_deferred == 0
    for llm in (sync, pipelined):
        assert_all_blocks_back(llm)


def test_async_scheduling_under_preemption_keeps_every_output(tiny_llama, prompts):
    # 24 blocks of 8 slots: room for about two of these sequences at once
    sync, pipelined = both(tiny_llama, num_blocks=24, block_size=8, max_num_batched_tokens=64)
    requests = [
        (p, SamplingParams(temperature=0.7 * (i % 2), seed=i, max_tokens=40, ignore_eos=True), "ar")
        for i, p in enumerate(prompts[:8])
    ]
    texts = run(LLM(tiny_llama, num_blocks=24, block_size=8, max_num_batched_tokens=64), requests)
    for i in (0, 3, 5):  # these end on a stop string, found in a deferred token (maybe while preempted)
        stop = texts[(str(i), 0)][1][40:44]
        params = replace(requests[i][1], stop=[stop])
        requests[i] = (requests[i][0], params, "ar")
    in_flight = []  # whether each preempted sequence's last token was still on the device
    preempt = pipelined.engine.scheduler.on_preempt
    pipelined.engine.scheduler.on_preempt = lambda seq: (
        in_flight.append(seq.token_ids[-1] < 0) or preempt(seq)
    )
    want, got = run(sync, requests), run(pipelined, requests)
    assert got == want
    assert [want[(str(i), 0)][2] for i in (0, 3, 5)] == ["stop"] * 3
    assert any(in_flight) and pipelined.engine.num_deferred > 0
    for llm in (sync, pipelined):
        assert_all_blocks_back(llm)


def test_a_sequence_preempted_with_its_stop_token_on_the_device_recomputes_and_ends_there(
    tiny_llama, prompts
):
    sync, pipelined = both(tiny_llama)
    full = sync.generate(prompts[4], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop_id = full[0].outputs[0].token_ids[6]
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id])
    want = sync.generate(prompts[4], params)[0].outputs[0]
    engine = pipelined.engine
    forward, refilled = engine.runner.forward, []  # prefill chunks that feed a token still on the device
    engine.runner.forward = lambda plans, placed=None: (
        refilled.extend(len(p.tokens) for p in plans if len(p.tokens) > 1 and p.tokens[-1] < 0)
        or forward(plans, placed)
    )
    engine.add_request("r", prompts[4], params)
    (seq,) = engine._requests["r"]
    tokens, reasons, preempted = [], [], False
    while engine.has_unfinished():
        for u in engine.step():
            tokens += u.token_ids
            reasons.append(u.finish_reason)
        if not preempted and seq.token_ids[-1] < 0 and seq.num_output_tokens == len(want.token_ids):
            engine.scheduler._preempt(seq)  # its stop token is still on the device
            preempted = True
    # re-admitted at once with its cached prompt blocks: the recompute's chunk ends with the placeholder
    assert preempted and refilled
    assert (tokens, reasons[-1]) == (want.token_ids, want.finish_reason) and want.finish_reason == "stop"
    assert_all_blocks_back(pipelined)


def test_async_scheduling_aborts_land_on_the_tokens_the_client_saw(tiny_llama, prompts):
    sync, pipelined = both(tiny_llama, max_num_batched_tokens=32)
    requests = [
        (p, SamplingParams(n=1 + i % 2, temperature=1.0, seed=i, max_tokens=30, ignore_eos=True), "ar")
        for i, p in enumerate(prompts[:10])
    ]
    abort_after = {0: 1, 2: 5, 4: 9, 6: 2, 8: 13}
    want = run(sync, requests, abort_after)
    got = run(pipelined, requests, abort_after)
    assert got == want
    assert {want[(str(i), 0)][2] for i in abort_after} == {"abort"}
    assert [len(want[(str(i), 0)][0]) for i in abort_after] == list(abort_after.values())
    assert pipelined.engine.num_deferred > 0
    for llm in (sync, pipelined):
        assert_all_blocks_back(llm)


def test_async_scheduling_drops_the_token_launched_after_a_stop_and_holds_nothing_after(tiny_llama, prompts):
    sync, pipelined = both(tiny_llama)
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    stop = sync.generate(prompts[4], greedy)[0].outputs[0].text[12:15]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    want = sync.generate(prompts[4], params)[0].outputs[0]
    got = pipelined.generate(prompts[4], params)[0].outputs[0]
    assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, "stop")
    # every token after the first (sampled at the prefill) was deferred; the one launched after the stop
    # was dropped, not counted, and nothing stays in flight
    assert pipelined.engine.num_deferred == len(got.token_ids) - 1
    assert_all_blocks_back(pipelined)


def test_async_scheduling_fails_a_request_alone_when_its_deferred_token_cannot_be_committed(
    tiny_llama, prompts, monkeypatch
):
    step = detokenizer.detokenize_step

    def poisoned(decode, seq, tokenizer):
        if seq.request_id == "1" and seq.num_output_tokens >= 4:
            raise RuntimeError("poisoned detokenizer")
        return step(decode, seq, tokenizer)

    monkeypatch.setattr(detokenizer, "detokenize_step", poisoned)
    sync, pipelined = both(tiny_llama)
    requests = [(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), "ar") for p in prompts[:3]]
    want, got = run(sync, requests), run(pipelined, requests)
    assert got == want
    assert [want[(str(i), 0)][2] for i in range(3)] == ["length", "error", "length"]
    assert pipelined.engine.num_deferred > 0
    for llm in (sync, pipelined):
        assert_all_blocks_back(llm)


def test_async_scheduling_server_streams_the_synchronous_text_and_frees_every_block(tiny_llama):
    prompts = [f"def function_{i}(x, y):" for i in range(16)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    offline = LLM(tiny_llama)
    full = [o.outputs[0].text for o in offline.generate(prompts, greedy)]
    stops = [t[8:11] if i % 3 == 0 else None for i, t in enumerate(full)]  # a third end on a stop string
    expected = [
        o.outputs[0].text
        for o in offline.generate(
            prompts,
            [
                SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[s] if s else [])
                for s in stops
            ],
        )
    ]

    async def one(client: openai.AsyncOpenAI, model: str, i: int) -> str | None:
        extra = {"ignore_eos": True} | ({"stop": [stops[i]]} if stops[i] else {})
        stream = await client.completions.create(
            model=model, prompt=prompts[i], stream=True, temperature=0, max_tokens=24, extra_body=extra
        )
        return await read_stream(stream, 3 if i % 4 == 1 else None)

    async def main(base_url: str) -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        return await asyncio.gather(*(one(client, model, i) for i in range(16)))

    with running_server(model=tiny_llama, max_num_seqs=16, async_scheduling=True) as (base_url, app):
        results = asyncio.run(main(base_url))
        wait_until_free(base_url)
        assert app.state.engine.num_deferred > 0
    kept = [i for i in range(16) if i % 4 != 1]
    assert [results[i] for i in kept] == [expected[i] for i in kept]
    assert any(s and s not in t and t != f for s, t, f in zip(stops, expected, full, strict=True))


def test_async_scheduling_is_refused_with_tensor_parallelism():
    with pytest.raises(ValidationError, match="async_scheduling"):
        EngineConfig(async_scheduling=True, tensor_parallel_size=2)
