"""Grammar constraints (llguidance): outputs always validate, with every strategy, and stay lossless."""

from __future__ import annotations

import itertools
import json

import jsonschema
import llguidance
import llguidance.torch
import pytest
import torch

from branchwise import LLM, SamplingParams
from branchwise.constraints import Constraint, Grammars, apply_bitmask

# strings and numbers are bounded so that even a random model finishes within max_tokens
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["person", "ok"],
        "additionalProperties": False,
    },
    "array_bounds_enum": {
        "type": "array",
        "items": {"enum": ["red", "green", "blue"]},
        "minItems": 2,
        "maxItems": 4,
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "price": {"type": "number", "minimum": 0, "maximum": 99, "multipleOf": 0.5},
            "count": {"type": "integer", "exclusiveMinimum": 3, "maximum": 9},
        },
        "required": ["price", "count"],
        "additionalProperties": False,
    },
    "pattern_format": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "day": {"type": "string", "format": "date"},
        },
        "required": ["code", "day"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "note": {"type": "string", "maxLength": 5},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "any_of": {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 50},
            {
                "type": "object",
                "properties": {"tag": {"enum": ["x", "y"]}},
                "required": ["tag"],
                "additionalProperties": False,
            },
        ]
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def llm(spec_target) -> LLM:
    return LLM(spec_target, max_num_batched_tokens=512)  # its draft/ is found beside it


def texts(llm: LLM, prompts, params, strategy: str, **strategy_params) -> list:
    outs = llm.generate(prompts, params, strategy=strategy, strategy_params=strategy_params or None)
    return [c for o in outs for c in o.outputs]


@pytest.mark.parametrize("strategy", ["ar", "draft", "ngram", "mtp", "medusa"])
def test_every_output_validates_with_every_strategy_greedy_and_sampled(llm, prompts, strategy):
    for name, schema in SCHEMAS.items():
        constraint = Constraint.json_schema(schema)
        for temperature in (0.0, 1.0):
            params = SamplingParams(temperature=temperature, max_tokens=200, constraint=constraint, seed=3)
            for out in texts(llm, prompts[:4], params, strategy):
                assert out.finish_reason == "stop", (name, out.text)
                jsonschema.validate(json.loads(out.text), schema)


def test_constrained_greedy_is_the_same_for_every_strategy(llm, prompts):
    for schema in (SCHEMAS["nested"], SCHEMAS["refs"], SCHEMAS["array_bounds_enum"]):
        params = SamplingParams(temperature=0, max_tokens=200, constraint=Constraint.json_schema(schema))
        ar = [o.token_ids for o in texts(llm, prompts[:8], params, "ar")]
        for strategy in ("draft", "ngram", "mtp"):
            for k in (1, 4):
                outs = texts(llm, prompts[:8], params, strategy, num_speculative_tokens=k)
                assert [o.token_ids for o in outs] == ar
        for choices in (None, [[0], [1], [2], [0, 0], [1, 0], [0, 0, 0]]):  # adaptive and pinned trees
            outs = texts(llm, prompts[:8], params, "medusa", **({"choices": choices} if choices else {}))
            assert [o.token_ids for o in outs] == ar


def test_regex_choice_and_lark_grammars(llm, prompts):
    cases = [
        (Constraint("regex", r"[a-c]{2,5}-[0-9]{3}"), r"^[a-c]{2,5}-[0-9]{3}$"),
        (Constraint.choice(["yes", "no", "maybe"]), r"^(yes|no|maybe)$"),
        (
            Constraint("grammar", 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'),
            r"^\(\d{1,2}(,\d{1,2})*\)$",
        ),
    ]
    import re

    for constraint, pattern in cases:
        for strategy in ("ar", "ngram"):
            params = SamplingParams(temperature=1.0, max_tokens=60, constraint=constraint, seed=1)
            for out in texts(llm, prompts[:4], params, strategy):
                assert re.match(pattern, out.text), (constraint.kind, out.text)


def test_jump_forward_appends_forced_tokens_without_sampling(llm, prompts):
    schema = SCHEMAS["refs"]  # keys and punctuation are fixed: most tokens are forced
    params = SamplingParams(temperature=0, max_tokens=200, constraint=Constraint.json_schema(schema))
    out = texts(llm, prompts[:2], params, "ar")
    assert all(o.num_forced > len(o.token_ids) / 2 for o in out)
    forced = [m for m in llm.engine.metrics.registry.collect() if m.name.endswith("forced_tokens")]
    assert sum(s.value for m in forced for s in m.samples if s.name.endswith("_total")) > 0


def test_drafting_goes_on_right_after_a_forced_continuation(llm, prompts):
    """A grammar's forced tokens are fed with drafts after them in the same step (draft model, prompt
    lookup), not in a step of their own without drafts; the tokens stay those of `ar`."""
    params = SamplingParams(temperature=0, max_tokens=200, constraint=Constraint.json_schema(SCHEMAS["refs"]))
    ar = [o.token_ids for o in texts(llm, prompts[:4], params, "ar")]
    for name in ("draft", "ngram"):
        strategy, seen = llm.engine.strategy(name), []
        propose = strategy.propose

        def spy(seqs, budgets, propose=propose, seen=seen):
            pending = [s.num_pending for s in seqs]
            plans = propose(seqs, budgets)
            seen += [(n, len(p.drafts)) for n, p in zip(pending, plans, strict=True)]
            return plans

        strategy.propose = spy
        try:
            outs = texts(llm, prompts[:4], params, name, num_speculative_tokens=4)
        finally:
            del strategy.propose
        assert [o.token_ids for o in outs] == ar
        assert any(n > 1 and drafted for n, drafted in seen), name


def test_rejected_drafts_leave_the_matcher_as_before(llm, prompts):
    """After every step the matcher's state equals a fresh matcher fed exactly the committed output."""
    engine = llm.engine
    grammars = engine.grammars()
    constraint = Constraint.json_schema(SCHEMAS["nested"])
    params = SamplingParams(temperature=1.0, max_tokens=200, constraint=constraint, seed=5)
    for i, p in enumerate(prompts[:6]):
        engine.add_request(f"rb{i}", p, params, ["draft", "ngram"][i % 2], {"num_speculative_tokens": 4})
    rejected = 0
    while engine.has_unfinished():
        for u in engine.step():
            rejected += u.num_drafted - u.num_accepted
        for seq in engine.scheduler.running:
            fresh = grammars.matcher(constraint)
            assert fresh.consume_tokens(seq.output_token_ids)
            assert torch.equal(grammars.masks([seq.matcher], [[]]), grammars.masks([fresh], [[]]))
    assert rejected > 0


def test_bad_or_unenforceable_schemas_are_refused_naming_the_keyword(llm, prompts):
    for schema, word in (({"type": "string", "not": {"const": "a"}}, "not"), ({"type": "wat"}, "wat")):
        with pytest.raises(ValueError, match=word):
            llm.generate(prompts[0], SamplingParams(constraint=Constraint.json_schema(schema)))
    lenient = Constraint.json_schema(
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, True
    )
    assert "uniqueItems" in " ".join(llm.engine.check_constraint(lenient))
    assert llm.engine.blocks.num_available == llm.engine.num_blocks


def test_masks_for_a_draft_follow_the_matcher_through_it(llm):
    """Row i of a drafted chain's masks is the mask after the first i drafted tokens (not row 0 again)."""
    grammars = llm.engine.grammars()
    matcher = grammars.matcher(Constraint("regex", r"ab(c|d)"))
    ids = llm.tokenizer.encode("ab", add_special_tokens=False)
    masks = grammars.masks([matcher], [ids])
    for i in range(len(ids) + 1):
        step = llguidance.LLMatcher(grammars.tokenizer, grammars.compile(Constraint("regex", r"ab(c|d)"))[0])
        assert step.consume_tokens(ids[:i])
        want = llguidance.torch.allocate_token_bitmask(1, grammars.vocab_size)
        llguidance.torch.fill_next_token_bitmask(step, want)
        assert torch.equal(masks[i], want[0])
    assert not torch.equal(masks[0], masks[-1])


def test_a_drafters_rows_are_reused_and_only_the_row_after_the_draft_is_computed(llm):
    """Verification given the rows its drafter computed gets the same masks as computing them all, and the
    matcher is back where it was; rows given for a draft the grammar does not take are not trusted."""
    grammars = llm.engine.grammars()
    constraint = Constraint("regex", r"ab(c|d)")
    matcher = grammars.matcher(constraint)
    ids = llm.tokenizer.encode("ab", add_special_tokens=False)
    full = grammars.masks([matcher], [ids])
    reused = grammars.masks([matcher], [ids], [full[: len(ids)].clone()])
    assert torch.equal(reused, full)
    assert torch.equal(grammars.masks([matcher], [[]])[0], full[0])  # rolled back to the start
    wrong = llm.tokenizer.encode("zz", add_special_tokens=False)
    garbage = torch.zeros(len(wrong), full.shape[-1], dtype=torch.int32)
    masks = grammars.masks([matcher], [wrong], [garbage])
    assert not torch.equal(masks[0], garbage[0])  # computed, not the given rows
    assert torch.equal(grammars.masks([matcher], [[]])[0], full[0])


def test_each_sequence_gets_its_own_matcher_equal_to_a_fresh_parse(llm):
    """Matchers are copies of one compiled at the grammar's start: advancing one leaves the others and
    the next copy at the start, and every copy's masks equal those of the grammar parsed anew."""
    tokenizer = llm.tokenizer
    grammars = Grammars(tokenizer, llm.engine.vocab_size, llm.engine.eos_token_ids)
    constraint = Constraint.json_schema(SCHEMAS["nested"])
    first, second = grammars.matcher(constraint), grammars.matcher(constraint)
    fresh = llguidance.LLMatcher(grammars.tokenizer, grammars.compile(constraint)[0])
    start = grammars.masks([fresh], [[]])
    ids = tokenizer.encode('{"person":{"name":"ab","age":7},"ok":true}', add_special_tokens=False)
    for token in ids:
        assert torch.equal(grammars.masks([first], [[]]), grammars.masks([fresh], [[]]))
        assert first.consume_token(token) and fresh.consume_token(token)
    assert first.is_stopped() or first.is_accepting()
    for m in (second, grammars.matcher(constraint)):
        assert torch.equal(grammars.masks([m], [[]]), start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # numpy's path, torch's path
def test_apply_bitmask_sets_minus_inf_exactly_where_a_bit_is_zero(dtype):
    """Bit j of word w allows token 32 w + j; a vocabulary that is not a multiple of 32 ends mid-word."""
    gen = torch.Generator().manual_seed(0)
    vocab = 70
    words = torch.randint(-(2**31), 2**31 - 1, (2, 3, 3), dtype=torch.int32, generator=gen)
    logits = torch.randn(2, 3, vocab, dtype=dtype, generator=gen)
    out = apply_bitmask(logits, words)
    for b, r, t in itertools.product(range(2), range(3), range(vocab)):
        allowed = (int(words[b, r, t // 32]) >> (t % 32)) & 1
        assert out[b, r, t].item() == (logits[b, r, t].item() if allowed else float("-inf"))
    assert out.dtype == dtype


def test_demo_model_extraction_validates_with_every_strategy():
    import random

    from branchwise.models.demo import ASSET_DIR
    from branchwise.train.demo_data import extraction
    from branchwise.train.eval import schema_of

    demo = LLM(str(ASSET_DIR))
    rng = random.Random(21)
    jobs = [extraction(rng) for _ in range(12)]
    prompts = [demo.chat_prompt([{"role": "user", "content": m}]) for m, _, _ in jobs]
    for strategy in ("ar", "draft", "ngram", "suffix", "mtp", "medusa"):
        for temperature in (0.0, 1.0):
            params = [
                SamplingParams(
                    temperature=temperature,
                    max_tokens=120,
                    seed=i,
                    constraint=Constraint.json_schema(schema_of(f)),
                )
                for i, (_, _, f) in enumerate(jobs)
            ]
            for out, (_, _, fields) in zip(texts(demo, prompts, params, strategy), jobs, strict=True):
                jsonschema.validate(json.loads(out.text), schema_of(fields))


def test_chains_skip_masks_only_where_the_targets_argmax_is_allowed_and_keep_the_masked_tokens(
    llm, prompts, monkeypatch
):
    """Greedy chains under a grammar are verified without masks where the grammar allows the target's own
    argmax at every row: the tokens are those of masking every row, on the demo model (which follows its
    schemas: masks mostly skipped) and a random model (which does not: masks mostly computed)."""
    import random

    from branchwise.models.demo import ASSET_DIR
    from branchwise.strategies import base
    from branchwise.train.demo_data import extraction
    from branchwise.train.eval import schema_of

    demo = LLM(str(ASSET_DIR))
    rng = random.Random(5)
    jobs = [extraction(rng) for _ in range(6)]
    cases = [
        (
            demo,
            [demo.chat_prompt([{"role": "user", "content": m}]) for m, _, _ in jobs],
            [
                SamplingParams(temperature=0, max_tokens=80, constraint=Constraint.json_schema(schema_of(f)))
                for *_, f in jobs
            ],
        ),
        (
            llm,
            prompts[:6],
            [
                SamplingParams(
                    temperature=0, max_tokens=80, constraint=Constraint.json_schema(SCHEMAS["nested"])
                )
            ]
            * 6,
        ),
    ]
    choose = base.matchers_to_mask
    counts = {"skipped": 0, "masked": 0}

    def counted(seqs, first, drafts, logits):
        matchers = choose(seqs, first, drafts, logits)
        counts["skipped"] += sum(
            m is None and s.matcher is not None for m, s in zip(matchers, seqs, strict=True)
        )
        counts["masked"] += sum(m is not None for m in matchers)
        return matchers

    for model, ps, params in cases:
        for strategy in ("ar", "draft", "ngram", "mtp"):
            if strategy == "draft" and model is demo:
                continue  # the demo's draft model is exercised by the bench; the spec target has one
            monkeypatch.setattr(
                base, "matchers_to_mask", lambda seqs, first, drafts, logits: [s.matcher for s in seqs]
            )
            want = [o.token_ids for o in texts(model, ps, params, strategy)]
            monkeypatch.setattr(base, "matchers_to_mask", counted)
            got = [o.token_ids for o in texts(model, ps, params, strategy)]
            assert got == want, (strategy, model is demo)
    assert counts["skipped"] > 100 and counts["masked"] > 100, counts
