"""GPU only (`pytest -m gpu`): the engine on Triton attention and CUDA graphs against the reference."""

from __future__ import annotations

import pytest
import torch

from branchwise import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PARAMS = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def greedy(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]


def test_engine_greedy_is_identical_on_reference_and_triton_attention(tiny_qwen2, prompts, monkeypatch):
    monkeypatch.setenv("BRANCHWISE_ATTENTION", "reference")
    want = greedy(LLM(tiny_qwen2, dtype="float32", max_num_batched_tokens=64, num_blocks=2048), prompts)
    monkeypatch.setenv("BRANCHWISE_ATTENTION", "triton")
    assert (
        greedy(
            LLM(tiny_qwen2, dtype="float32", max_num_batched_tokens=64, enforce_eager=True, num_blocks=2048),
            prompts,
        )
        == want
    )


# fp32 only: in bf16 the compiled graph path fuses elementwise ops (one rounding instead of several), so
# its logits differ in the last bits from the eager path's and a random model's near-ties can flip
@pytest.mark.parametrize("dtype", ["float32"])
def test_cuda_graphs_on_and_off_give_identical_greedy_outputs(tiny_llama, prompts, dtype):
    eager = LLM(tiny_llama, dtype=dtype, enforce_eager=True, num_blocks=2048)
    graphs = LLM(tiny_llama, dtype=dtype, num_blocks=2048)
    assert graphs.engine.runner.graphs is not None
    assert greedy(graphs, prompts) == greedy(eager, prompts)


def test_decode_steps_replay_captured_graphs(tiny_llama, prompts):
    llm = LLM(tiny_llama, dtype="bfloat16", num_blocks=2048)
    graphs = llm.engine.runner.graphs
    replayed = []
    replay = graphs.replay
    graphs.replay = lambda packed, fill=None: (lambda h: replayed.append(h is not None) or h)(
        replay(packed, fill)
    )
    llm.generate(prompts[:4], PARAMS)
    assert sum(replayed) >= 31  # every decode step after the prefill ran from a graph
    assert torch.cuda.is_available() and len(graphs.graphs) == len(graphs.buckets)


def test_async_scheduling_on_cuda_graphs_gives_the_tokens_of_synchronous_stepping(tiny_llama, prompts):
    from test_async_scheduling import run

    requests = [
        (p, SamplingParams(temperature=0.8 * (i % 2), seed=i, max_tokens=32 + i, ignore_eos=True), "ar")
        for i, p in enumerate(prompts)
    ]
    sync = LLM(tiny_llama, dtype="float32", num_blocks=2048)
    pipelined = LLM(tiny_llama, dtype="float32", num_blocks=2048, async_scheduling=True)
    assert pipelined.engine.runner.graphs is not None
    assert run(pipelined, requests, {3: 7}) == run(sync, requests, {3: 7})
    assert pipelined.engine.num_deferred > 0
