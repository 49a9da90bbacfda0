"""Tensor parallel over two gloo ranks on this host: the same tokens as one process, every block back."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from branchwise import LLM, SamplingParams
from branchwise.engine.tensor_parallel import check

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def generate_ids(path: str, prompt: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def tokens(outputs) -> list[list[int]]:
    return [c.token_ids for o in outputs for c in o.outputs]


@pytest.fixture
def sharded():
    """LLM(..., tensor_parallel_size=2) factory; every engine's ranks are stopped after the test."""
    made = []

    def make(model: str, **kw) -> LLM:
        made.append(LLM(model, tensor_parallel_size=2, **kw))
        return made[-1]

    yield make
    for llm in made:
        llm.engine.close()


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2"])
def test_two_ranks_greedy_equals_transformers_generate(arch, request, sharded, prompts):
    path = request.getfixturevalue(arch)
    llm = sharded(path)
    got = tokens(llm.generate(prompts, GREEDY))
    for prompt, ids in zip(prompts, got, strict=True):
        assert ids and ids == generate_ids(path, prompt, GREEDY.max_tokens)  # both stop at EOS
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_two_ranks_sample_n_and_abort_and_preempt_losing_nothing(tiny_llama, sharded, prompts):
    """Seeded samples under preemption equal the same ranks' samples with room for everything. (Not one
    rank's: two ranks add their partial sums in another order, and a last-bit difference may move a sample
    across a boundary of the distribution; greedy tokens are compared with one rank's.)"""
    sampled = [SamplingParams(max_tokens=20, temperature=0.8, n=3, seed=i) for i in range(len(prompts))]
    roomy = sharded(tiny_llama, num_blocks=256)
    want_sampled = tokens(roomy.generate(prompts, sampled))
    assert roomy.engine.scheduler.num_preemptions == 0
    roomy.engine.close()
    want_greedy = tokens(LLM(tiny_llama, num_blocks=64).generate(prompts, GREEDY))
    # 12 blocks of 16 tokens cannot hold every sequence at once: the scheduler preempts
    llm = sharded(tiny_llama, num_blocks=12, max_num_seqs=8)
    assert tokens(llm.generate(prompts, sampled)) == want_sampled  # n > 1: forks, copy-on-write
    assert llm.engine.scheduler.num_preemptions > 0
    engine = llm.engine
    before = engine.scheduler.num_preemptions
    assert tokens(llm.generate(prompts * 2, GREEDY)) == want_greedy * 2
    assert engine.scheduler.num_preemptions > before
    engine.add_request("doomed", prompts[0], SamplingParams(max_tokens=150, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("doomed")
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_available == engine.num_blocks
    assert tokens(llm.generate(prompts, GREEDY)) == want_greedy  # the ranks' caches still agree


def test_every_strategy_under_two_ranks_writes_one_ranks_tokens(sharded):
    """Draft model, MTP, Medusa and EAGLE-3 run on rank 0 over gathered hidden states; Multiverse's merges
    and family swaps move K/V on every rank. A 10-block cache preempts under every strategy."""
    alone = LLM("demo")
    questions = ["What is (12+7)*(30-4)?", "Extract: Anna, 31, lives in Oslo.", "What is 8*(5+2)?"]
    questions += ["What is (3+9)*(14-6)?", "Extract: Bob, 45, lives in Rome.", "What is 6*(7+1)?"]
    prompts = [alone.chat_prompt([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_tokens=64, temperature=0)
    lossless = tokens(alone.generate(prompts, params))
    multiverse = tokens(alone.generate(prompts, params, strategy="multiverse"))  # its own output
    llm = sharded("demo", num_blocks=10)
    for name in ["ar", "ngram", "suffix", "draft", "mtp", "medusa", "eagle3", "multiverse"]:
        before = llm.engine.scheduler.num_preemptions
        want = multiverse if name == "multiverse" else lossless
        assert tokens(llm.generate(prompts, params, strategy=name)) == want, name
        assert llm.engine.scheduler.num_preemptions > before, name
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_a_split_the_model_cannot_take_is_a_clear_error_before_any_rank_starts():
    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    check(config, 2)
    with pytest.raises(ValueError, match="does not divide the model's num_attention_heads"):
        check(config, 3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        check(config, 4)
    with pytest.raises(ValueError, match="intermediate_size"):
        check(LlamaConfig(num_attention_heads=4, num_key_value_heads=4, intermediate_size=130), 4)
    qwen = Qwen2Config()
    qwen.base_model_tp_plan = None  # as an architecture transformers has no plan for
    with pytest.raises(ValueError, match="no tensor-parallel plan"):
        check(qwen, 2)
