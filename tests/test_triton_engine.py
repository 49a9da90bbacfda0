"""The engine end to end on Triton attention (the interpreter on CPU): same greedy tokens as the reference,
eager and through the CUDA-graph path's static buffers (captured on a GPU, run eagerly here)."""

from __future__ import annotations

import pytest

from branchwise import LLM, SamplingParams
from branchwise.engine.model_runner import CudaGraphs

pytest.importorskip("triton")

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]


def test_triton_attention_gives_the_reference_greedy_tokens(tiny_qwen2, prompts, monkeypatch):
    chosen = [prompts[0], prompts[1], prompts[3], prompts[9]]  # 3, 90, 5 and 50 tokens
    monkeypatch.setenv("BRANCHWISE_ATTENTION", "reference")
    want = greedy(LLM(tiny_qwen2, dtype="float32", max_num_batched_tokens=64, num_blocks=512), chosen)
    monkeypatch.setenv("BRANCHWISE_ATTENTION", "triton")
    llm = LLM(tiny_qwen2, dtype="float32", max_num_batched_tokens=64, enforce_eager=True, num_blocks=512)
    assert greedy(llm, chosen) == want


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_graph_buffers_pad_and_replay_any_decode_mix(tiny_llama, prompts, monkeypatch, async_scheduling):
    chosen = [prompts[2], prompts[4], prompts[6]]
    monkeypatch.setenv("BRANCHWISE_ATTENTION", "reference")
    want = greedy(LLM(tiny_llama, dtype="float32", num_blocks=512), chosen)
    monkeypatch.setenv("BRANCHWISE_ATTENTION", "triton")
    llm = LLM(tiny_llama, dtype="float32", block_size=8, enforce_eager=True, num_blocks=512)
    llm.engine.config.async_scheduling = async_scheduling
    runner = llm.engine.runner
    runner.graphs = CudaGraphs(runner, max_tokens=8, max_blocks_per_seq=64, capture=False)
    used, filled = [], []
    replay = runner.graphs.replay

    def recorded(packed, fill=None):
        used.append(len(packed.ids))
        filled.append(0 if fill is None else len(fill[0]))
        return replay(packed, fill)

    runner.graphs.replay = recorded
    assert greedy(llm, chosen) == want
    assert 3 in used  # decode steps of 3 sequences ran padded to the 4-token bucket
    # async: their 3 input tokens were still on the device, written into the buffers after staging
    assert (3 in filled) == async_scheduling


def test_graph_replay_writes_only_real_slots_and_matches_eager(tiny_llama, prompts, monkeypatch):
    monkeypatch.setenv("BRANCHWISE_ATTENTION", "triton")
    llm = LLM(tiny_llama, dtype="float32", block_size=8, enforce_eager=True, num_blocks=512)
    engine = llm.engine
    for i in (2, 4, 6):
        engine.add_request(str(i), prompts[i], PARAMS)
    engine.step()  # prefill all three; each is now decode-ready
    runner = engine.runner
    graphs = CudaGraphs(runner, max_tokens=8, max_blocks_per_seq=64, capture=False)
    seqs = list(engine.scheduler.running)
    for s in seqs:
        engine.blocks.allocate(s, s.num_computed + 1)
    plans = engine.strategy("ar").propose(seqs, [1, 1, 1])
    packed = runner.pack(plans)
    pool_before = runner.pool.clone()
    hidden = graphs.replay(packed)  # 3 tokens padded to the 4-token bucket
    L, _, blocks, bs = runner.pool.shape[:4]
    diff = (runner.pool != pool_before).view(L, 2, blocks * bs, -1).any(-1).any(1).any(0)  # (slots,)
    assert set(diff.nonzero().flatten().tolist()) == set(packed.slots.tolist())
    runner.pool.copy_(pool_before)
    eager = runner.run_decoder(*runner.metadata(packed))
    assert hidden.shape == eager.shape and (hidden - eager).abs().max() < 1e-4


def test_skinny_gemm_gives_the_reference_greedy_tokens(tiny_qwen2, prompts, monkeypatch):
    """Every fused projection of the decode steps through the Triton skinny GEMM (as if tuning had chosen
    it for every shape), eager and compiled: the tokens of torch's GEMMs."""
    from branchwise import kernels
    from branchwise.kernels import triton_linear
    from branchwise.models import fused
    from branchwise.models.fused import fused_weights

    # row-major weights, as on a GPU (the CPU layout probe may pick column-major, which the skinny GEMM
    # leaves to torch)
    monkeypatch.setattr(fused, "pick_cpu_layout", lambda weights: False)
    chosen = [prompts[0], prompts[3], prompts[9]]
    want = greedy(LLM(tiny_qwen2, dtype="float32", num_blocks=512), chosen)
    llm = LLM(tiny_qwen2, dtype="float32", num_blocks=512)
    configs = {(*w.shape, w.dtype): (32, 32, 2, 4, 3) for w in fused_weights(llm.engine.model)}
    assert len(configs) == 4  # qkv, o, gate_up, down
    monkeypatch.setattr(kernels, "LINEAR_CONFIGS", configs)
    calls = []
    skinny = triton_linear.skinny_linear
    monkeypatch.setattr(triton_linear, "skinny_linear", lambda *a: calls.append(1) or skinny(*a))
    assert greedy(llm, chosen) == want
    assert calls  # decode steps took it (prefill chunks of > 16 tokens keep torch's GEMM)
    # and inside the compiled decoder of the CUDA-graph path, as one opaque op
    monkeypatch.setenv("BRANCHWISE_ATTENTION", "triton")
    runner = llm.engine.runner
    runner.graphs = CudaGraphs(runner, max_tokens=8, max_blocks_per_seq=64, capture=False)
    calls.clear()
    assert greedy(llm, chosen) == want
    assert calls
