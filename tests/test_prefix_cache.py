"""Radix prefix cache: shared prefixes skip their prefill, outputs do not change, eviction is safe."""

from __future__ import annotations

from prometheus_client import generate_latest

from branchwise import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def test_a_shared_prefix_skips_its_prefill_and_gives_the_cold_output(tiny_llama, prompts):
    system = prompts[1] + prompts[12]  # 171 tokens: ten full blocks of 16
    asks = [system + p for p in prompts[:6]]
    cold = LLM(tiny_llama, prefix_cache=False)
    want = [o.outputs[0].token_ids for o in cold.generate(asks, GREEDY)]
    llm = LLM(tiny_llama)
    first = llm.generate(asks[0], GREEDY)[0]
    assert first.usage["cached_prompt_tokens"] == 0
    rest = llm.generate(asks[1:], GREEDY)
    assert [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in rest] == want
    assert all(o.usage["cached_prompt_tokens"] == 160 for o in rest)
    again = llm.generate(asks[0], GREEDY)[0]  # the whole prompt but its last token: 11 blocks cached
    assert again.usage["cached_prompt_tokens"] == (len(asks[0]) - 1) // 16 * 16
    assert again.outputs[0].token_ids == want[0]
    text = generate_latest(llm.engine.metrics.registry).decode()
    hits = [line for line in text.splitlines() if line.startswith("branchwise:prefix_cache_hits_total")]
    assert float(hits[0].split()[-1]) == 5 * 160 + again.usage["cached_prompt_tokens"]


def test_eviction_under_memory_pressure_never_frees_a_block_in_use(tiny_llama, prompts):
    llm = LLM(tiny_llama, num_blocks=40, max_num_batched_tokens=64)
    engine = llm.engine
    cold = LLM(tiny_llama, num_blocks=40, max_num_batched_tokens=64, prefix_cache=False)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    rounds = [prompts[i : i + 4] for i in range(0, 16, 4)] * 2  # the second pass finds some of it cached
    for batch in rounds:
        for i, p in enumerate(batch):
            engine.add_request(f"{id(batch)}-{i}-{engine.num_steps}", p, params)
        got = {}
        while engine.has_unfinished():
            for u in engine.step():
                got.setdefault(u.request_id, []).extend(u.token_ids)
            in_use = [b for s in engine.scheduler.running for b in s.block_table]
            free = set(engine.blocks.free_blocks)
            assert not free & set(in_use)
            assert all(engine.blocks.ref_counts[b] >= 1 for b in in_use)
        want = [o.outputs[0].token_ids for o in cold.generate(batch, params)]
        assert list(got.values()) == want
    assert engine.prefix_cache.num_nodes > 0 and engine.prefix_cache.num_evicted > 0
    assert (
        sum(
            s.value
            for m in engine.metrics.registry.collect()
            if m.name.endswith("prefix_cache_hits")
            for s in m.samples
            if s.name.endswith("_total")
        )
        > 0
    )
    assert engine.blocks.num_available == engine.num_blocks
