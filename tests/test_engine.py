"""The engine trunk: equality with transformers, batch invariance, sampling, stops, n > 1, preemption."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import SentencePieceBPETokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from branchwise import LLM, SamplingParams
from branchwise.engine import detokenizer
from branchwise.engine.sequence import Sequence
from branchwise.models.fused import FusedAttention, FusedMLP, rope_rows
from branchwise.train.tokenizer import stdlib_files

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def hf_greedy(path: str, prompt: list[int], max_new: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_mistral_sliding"])
def test_greedy_equals_transformers_generate(arch, request, prompts):
    path = request.getfixturevalue(arch)
    llm = LLM(path, max_num_batched_tokens=32)
    layer = llm.engine.model.model.layers[0]  # the fused projections are what is compared
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    chosen = [prompts[1], prompts[3], prompts[12]]  # 90, 5 and 81 tokens: past the sliding window of 12
    outs = llm.generate(chosen, GREEDY)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for prompt, out in zip(chosen, outs, strict=True):
        ref = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0
        )
        assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()


def test_rope_rows_are_hf_rotary_bit_for_bit_at_any_positions(tiny_qwen2):
    """The CPU's table rows equal HF's rotary module called on exactly these positions, also past the first
    table (it grows), in any order."""
    rotary = LLM(tiny_qwen2).engine.model.model.rotary_emb
    h = torch.zeros(1, 8)
    for positions in ([0, 5, 3, 1023], [2500, 7, 1024]):
        pos = torch.tensor(positions)
        cos, sin = rope_rows(rotary, h, pos)
        want_cos, want_sin = rotary(h, pos[None])
        half = want_sin.shape[-1] // 2
        assert cos.shape == (len(positions), 1, 2 * half) and torch.equal(cos[:, 0], want_cos[0])
        assert torch.equal(sin[:, 0, :half], -want_sin[0, :, :half])
        assert torch.equal(sin[:, 0, half:], want_sin[0, :, half:])
    assert rotary.rows_table.shape[0] == 4096


def test_greedy_is_batch_invariant_with_chunked_prefill(tiny_llama, prompts):
    llm = LLM(tiny_llama, max_num_batched_tokens=48)  # the 90- and 81-token prompts need several chunks
    alone = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert batched == alone
    assert all(len(t) == 24 for t in batched)


def test_seeded_sampling_is_reproducible_across_batch_compositions(tiny_llama, prompts):
    llm = LLM(tiny_llama)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate(prompts[2], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True)
    mixed = llm.generate([prompts[0], prompts[2], prompts[5]], [others, params, others])
    assert mixed[1].outputs[0].token_ids == alone
    unseeded = llm.generate([prompts[2]] * 4, SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True))
    assert len({tuple(o.outputs[0].token_ids) for o in unseeded}) > 1  # without a seed, samples differ


def test_stop_string_ends_output_without_leaking_it(tiny_llama, prompts):
    llm = LLM(tiny_llama)
    full = llm.generate(prompts[4], GREEDY)[0].outputs[0]
    stop = full.text[10:13]
    assert len(stop) == 3 and stop not in full.text[:10]
    out = llm.generate(prompts[4], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    c = out[0].outputs[0]
    assert c.finish_reason == "stop"
    assert c.text == full.text[: full.text.index(stop)]
    kept = llm.generate(
        prompts[4],
        SamplingParams(
            temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
        ),
    )[0].outputs[0]
    assert kept.text == full.text[: full.text.index(stop) + 3]


def _sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer (Metaspace: "▁" for spaces, the first one dropped on decoding)."""
    spm = SentencePieceBPETokenizer()
    texts = [p.read_text(errors="ignore") for p in stdlib_files(10)]
    spm.train_from_iterator(texts, vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=spm._tokenizer, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
@pytest.mark.parametrize("skip", [True, False])
def test_text_streamed_in_rust_equals_text_decoded_by_offsets(tokenizer, kind, skip):
    """tokenizers' DecodeStream gives what decoding by offsets gave, token by token, on text that splits
    multi-byte characters across tokens and holds special tokens; and both give the whole text."""
    tok = tokenizer if kind == "byte_level" else _sentencepiece_tokenizer()
    backend, decode = detokenizer.rust_tokenizer(tok), detokenizer.decoder_for(tok)
    assert backend is not None
    rng = random.Random(0)
    chars = "abc xyz,. 日本語テキスト 🙂👍 éàü ñ\n\t"
    for _ in range(150):
        prompt = tok.encode("".join(rng.choices(chars, k=rng.randint(1, 10))), add_special_tokens=False)
        out = tok.encode("".join(rng.choices(chars, k=rng.randint(5, 40))), add_special_tokens=False)
        if rng.random() < 0.3:  # a special token between characters
            more = tok.encode("".join(rng.choices(chars, k=rng.randint(1, 9))), add_special_tokens=False)
            out += [rng.choice(tok.all_special_ids), *more]
        texts = []
        for stream in (backend, None):
            params = SamplingParams(skip_special_tokens=skip)
            seq = Sequence(0, "r", 0, list(prompt) or [1], len(prompt) or 1, params, "ar", torch.Generator())
            detokenizer.init_offsets(seq, stream)
            text = ""
            for token in out:
                seq.token_ids.append(token)
                text += detokenizer.detokenize_step(decode, seq, stream)
            texts.append(text)
        assert texts[0] == texts[1]
        if kind == "byte_level":  # no leading space to drop: the output decodes alone to the same text
            assert texts[0] == tok.decode(out, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
@pytest.mark.parametrize("skip", [True, False])
def test_text_decoded_once_at_the_end_equals_text_streamed_token_by_token(tokenizer, kind, skip):
    """final_only's one decode gives what DecodeStream gave token by token, also for outputs cut inside a
    multi-byte character (held back) and for random token ids (invalid bytes in the middle)."""
    tok = tokenizer if kind == "byte_level" else _sentencepiece_tokenizer()
    backend, decode = detokenizer.rust_tokenizer(tok), detokenizer.decoder_for(tok)
    rng = random.Random(1)
    chars = "abc xyz,. 日本語テキスト 🙂👍 éàü ñ\n\t"
    for i in range(300):
        prompt = tok.encode("".join(rng.choices(chars, k=rng.randint(1, 10))), add_special_tokens=False) or [
            1
        ]
        if i % 3 == 0:
            out = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        else:
            out = tok.encode("".join(rng.choices(chars, k=rng.randint(5, 40))), add_special_tokens=False)
            out = out[: rng.randint(1, len(out))]
        texts = []
        for kind_ in ("delta", "final_only"):
            seq = Sequence(
                0,
                "r",
                0,
                list(prompt),
                len(prompt),
                SamplingParams(skip_special_tokens=skip, output_kind=kind_),
                "ar",
                torch.Generator(),
            )
            detokenizer.init_offsets(seq, backend)
            assert seq.text_at_end == (kind_ == "final_only")
            text = ""
            for token in out:
                seq.token_ids.append(token)
                text += "" if seq.text_at_end else detokenizer.detokenize_step(decode, seq, backend)
            texts.append(detokenizer.whole_text(decode, seq, seq.num_tokens) if seq.text_at_end else text)
        assert texts[0] == texts[1], (prompt, out)


def test_final_only_text_equals_streamed_text_at_every_ending(tiny_llama, prompts):
    """LLM.generate decodes once at the end (final_only); LLM.stream decodes token by token: the same text
    for endings by length, by a stop token (its text dropped or kept) and for n > 1 siblings."""
    llm = LLM(tiny_llama)
    full = llm.generate(prompts[3], GREEDY)[0].outputs[0]
    stop_id = full.token_ids[7]
    cases = [
        GREEDY,
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id]),
        SamplingParams(
            temperature=0,
            max_tokens=24,
            ignore_eos=True,
            stop_token_ids=[stop_id],
            include_stop_str_in_output=True,
        ),
        SamplingParams(
            temperature=1.0, seed=5, max_tokens=16, ignore_eos=True, skip_special_tokens=False, n=2
        ),
    ]
    for params in cases:
        whole = llm.generate(prompts[3], params)[0]
        streamed = ["" for _ in range(params.n)]
        for u in llm.stream(prompts[3], params):
            streamed[u.index] += u.text
        assert [c.text for c in whole.outputs] == streamed
        assert all(c.text for c in whole.outputs)
    kept = llm.generate(prompts[3], cases[2])[0].outputs[0].text
    dropped = llm.generate(prompts[3], cases[1])[0].outputs[0].text
    assert kept.startswith(dropped) and len(kept) > len(dropped)


def test_stop_token_ids_and_max_tokens_finish_reasons(tiny_llama, prompts):
    llm = LLM(tiny_llama)
    full = llm.generate(prompts[6], GREEDY)[0].outputs[0]
    stop_id = full.token_ids[5]
    out = llm.generate(
        prompts[6], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_id])
    )[0].outputs[0]
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop"
    assert full.finish_reason == "length" and len(full.token_ids) == 24


def test_n_samples_fork_one_prefill_and_each_follows_its_own_seed(tiny_llama, prompts):
    llm = LLM(tiny_llama)
    steps = llm.engine.num_steps
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate(prompts[1], params)[0]
    # one prefill step for the 90-token prompt, then 11 decode steps shared by the three samples
    assert llm.engine.num_steps - steps == 12
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i, c in enumerate(out.outputs):
        single = llm.generate(
            prompts[1], SamplingParams(temperature=1.0, seed=7 + i, max_tokens=12, ignore_eos=True)
        )
        assert c.token_ids == single[0].outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_logprobs_match_log_softmax_of_the_model_logits(tiny_qwen2, prompts):
    llm = LLM(tiny_qwen2)
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=10, logprobs=5, ignore_eos=True)
    c = llm.generate(prompts[5], params)[0].outputs[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    ids = torch.tensor([prompts[5] + c.token_ids])
    ref = torch.log_softmax(model(ids).logits[0].float(), -1)[len(prompts[5]) - 1 : -1]
    assert len(c.logprobs) == 10
    for row, entry, token in zip(ref, c.logprobs, c.token_ids, strict=True):
        assert entry["token_id"] == token
        assert entry["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        top_ids = [t for t, _ in entry["top"]]
        assert top_ids == row.topk(5).indices.tolist()


def test_preemption_under_a_small_kv_pool_keeps_every_output(tiny_llama, prompts):
    alone_llm = LLM(tiny_llama)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = [alone_llm.generate(p, params)[0].outputs[0].token_ids for p in prompts[:8]]
    # 24 blocks of 8 slots: room for about two of these sequences at once
    small = LLM(tiny_llama, num_blocks=24, block_size=8, max_num_batched_tokens=64)
    batched = [o.outputs[0].token_ids for o in small.generate(prompts[:8], params)]
    assert small.engine.scheduler.num_preemptions > 0
    assert batched == alone
    assert small.engine.blocks.num_available == 24


def test_every_block_returns_after_finish_and_abort(tiny_llama, prompts):
    llm = LLM(tiny_llama, max_num_batched_tokens=32)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(
            str(i), p, SamplingParams(n=1 + i % 3, temperature=1.0, max_tokens=30, ignore_eos=True)
        )
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < engine.num_blocks
    for i in range(0, 16, 2):
        engine.abort_request(str(i))  # some mid-prefill, some mid-decode, some with unforked siblings
    reasons = {}
    while engine.has_unfinished():
        for u in engine.step():
            if u.finish_reason:
                reasons[(u.request_id, u.index)] = u.finish_reason
    assert {r for (rid, _), r in reasons.items() if int(rid) % 2 == 0} == {"abort"}
    assert {r for (rid, _), r in reasons.items() if int(rid) % 2 == 1} == {"length"}
    assert engine.blocks.num_available == engine.num_blocks
    # every block is free or held by the prefix cache alone; evicting the cache frees them all
    assert all(c == (b in engine.blocks.cached) for b, c in enumerate(engine.blocks.ref_counts))
    engine.prefix_cache.evict(engine.num_blocks)
    assert engine.blocks.num_free == engine.num_blocks and not any(engine.blocks.ref_counts)


def test_request_validation_rejects_bad_input(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=64)
    engine = llm.engine
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("a", list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("b", list(range(64)), SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("c", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("d", [10**6], SamplingParams())
    with pytest.raises(ValueError, match="unknown strategy"):
        engine.add_request("e", [1, 2], SamplingParams(), strategy="nope")
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    assert not engine.has_unfinished()


def test_shallow_copy_of_strategy_state_matches_copy_copy_and_honours_custom_copies():
    from branchwise.engine.engine import _shallow_copy
    from branchwise.strategies.mtp import MTPState

    class Custom:
        def __init__(self) -> None:
            self.rows = [1]

        def __copy__(self):
            return "custom"

    class Slotted:
        __slots__ = ("rows",)

        def __init__(self) -> None:
            self.rows = [1]

    state = MTPState(computed=3, hidden=[torch.zeros(1)])
    copied = _shallow_copy(state)
    assert type(copied) is MTPState and copied is not state and vars(copied) == vars(state)
    assert copied.hidden is state.hidden  # shallow, as copy.copy
    copied.computed = 7
    assert state.computed == 3
    assert _shallow_copy(Custom()) == "custom"
    slotted = _shallow_copy(Slotted())
    assert type(slotted) is Slotted and slotted.rows == [1]
    assert _shallow_copy(None) is None


def test_inter_token_latency_observed_a_step_at_a_time_exports_what_a_histogram_would(tiny_llama, prompts):
    """The engine observes a step's inter-token latencies at once (`StepHistogram`: bucketed a few thousand
    at a time and at a scrape); a scrape shows the buckets, count and sum that prometheus_client's own
    Histogram gives the same values one by one, and the count is one per token chunk after each
    sequence's first."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from branchwise.engine.metrics import LATENCY_BUCKETS, StepHistogram

    def samples(registry) -> dict:
        text = generate_latest(registry).decode()
        return {
            (s.name, s.labels.get("le")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        }

    rng = random.Random(0)
    values = [rng.choice(LATENCY_BUCKETS) for _ in range(200)] + [rng.uniform(0, 100) for _ in range(200)]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    step_histogram = StepHistogram("t:itl", "help", "m", LATENCY_BUCKETS)
    step_histogram.FLUSH_AT = 100  # counted at 128, 256 and 384 values, the rest at the scrape
    ours.register(step_histogram)
    histogram = Histogram("t:itl", "help", ["model_name"], buckets=LATENCY_BUCKETS, registry=theirs)
    for v in values:  # values exactly at a bound included: Prometheus' `le` counts them in
        histogram.labels("m").observe(v)
    for at in range(0, len(values), 32):
        step_histogram.observe_many(values[at : at + 32])
    assert len(step_histogram.pending) == len(values) - 384
    got, want = samples(ours), samples(theirs)
    assert got.keys() == want.keys() and len(got) == len(LATENCY_BUCKETS) + 3
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key

    llm = LLM(tiny_llama)
    max_tokens = 6
    llm.generate(prompts[:3], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    count = samples(llm.engine.metrics.registry)[("branchwise:inter_token_latency_seconds_count", None)]
    assert count == 3 * (max_tokens - 1)
