"""Tool calls and reasoning: each family's format read whole and streamed, calls that are never malformed
under any strategy, reasoning split off with constraints applying only after it."""

from __future__ import annotations

import json
import random

import jsonschema
import openai
import pytest
from test_server import running_server

from branchwise import LLM, SamplingParams
from branchwise.constraints import Constraint, Grammars
from branchwise.models.loader import load_tokenizer
from branchwise.server.chat import ChatStream, plan_chat, read_output
from branchwise.server.reasoning import Qwen3Parser
from branchwise.server.tool_parsers import PARSERS, CallStream, call_schema

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ARGS_1 = '{"city": "Paris", "unit": "C"}'
ARGS_2 = '{"a":1,"b":{"nested": "}\\"]"}}'

# (parser, output, content, [(name, arguments)]) in each family's documented format
OUTPUTS = [
    ("hermes", "It is sunny.", "It is sunny.", []),
    (
        "hermes",
        f'Let me look.<tool_call>\n{{"name": "get_weather", "arguments": {ARGS_1}}}\n</tool_call>',
        "Let me look.",
        [("get_weather", ARGS_1)],
    ),
    (
        "hermes",
        f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS_1}}}\n</tool_call>\n'
        f'<tool_call>\n{{"name": "add", "arguments": {ARGS_2}}}\n</tool_call>',
        "",
        [("get_weather", ARGS_1), ("add", ARGS_2)],
    ),
    ("llama3_json", "Hello, no tools here.", "Hello, no tools here.", []),
    (
        "llama3_json",
        f'{{"name": "get_weather", "parameters": {ARGS_1}}}; {{"name": "add", "parameters": {ARGS_2}}}',
        "",
        [("get_weather", ARGS_1), ("add", ARGS_2)],
    ),
    ("llama3_json", f'<|python_tag|>{{"name": "add", "parameters": {ARGS_2}}}', "", [("add", ARGS_2)]),
    (
        "mistral",
        f'Sure. [TOOL_CALLS][{{"name": "get_weather", "arguments": {ARGS_1}}}, '
        f'{{"name": "add", "arguments": {ARGS_2}}}]',
        "Sure. ",
        [("get_weather", ARGS_1), ("add", ARGS_2)],
    ),
    ("json", f'[{{"name": "add", "parameters": {ARGS_2}}}]', "", [("add", ARGS_2)]),
]


@pytest.fixture(scope="module")
def tool_tokenizer(tool_target):
    return load_tokenizer(tool_target)


@pytest.mark.parametrize(
    "name,output,content,calls", OUTPUTS, ids=[f"{o[0]}-{i}" for i, o in enumerate(OUTPUTS)]
)
def test_each_format_reads_whole_and_streamed_at_every_split(tool_tokenizer, name, output, content, calls):
    parser = PARSERS[name](tool_tokenizer)
    got_content, got_calls = parser.parse(output)
    assert got_content == content and [(c.name, c.arguments) for c in got_calls] == calls
    rng = random.Random(0)
    for chunking in ("chars", "random"):
        stream, text, deltas, at = CallStream(parser, lambda: "call_x"), "", [], 0
        while at < len(output):
            step = 1 if chunking == "chars" else rng.randint(1, 9)
            piece, at = output[at : at + step], at + step
            more, calls_delta = stream.feed(piece, final=at >= len(output))
            text += more
            deltas += calls_delta
        assert text == content
        firsts = [d for d in deltas if "id" in d]
        assert [(d["index"], d["type"], d["function"]["name"]) for d in firsts] == [
            (i, "function", n) for i, (n, _) in enumerate(calls)
        ]
        for i, (_, arguments) in enumerate(calls):  # fragments concatenate to the JSON text
            assert "".join(d["function"]["arguments"] for d in deltas if d["index"] == i) == arguments


def test_calls_grammar_of_each_format_takes_valid_calls_and_refuses_bad_ones(tool_tokenizer):
    grammars = Grammars(tool_tokenizer, len(tool_tokenizer), {tool_tokenizer.eos_token_id})
    good = {
        "hermes": f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGS_1}}}\n</tool_call>',
        "llama3_json": f'{{"name": "get_weather", "parameters": {ARGS_1}}}',
        "json": f'[{{"name": "get_weather", "parameters": {ARGS_1}}}]',
    }
    for name, text in good.items():
        parser = PARSERS[name](tool_tokenizer)
        schema = call_schema([t["function"] for t in TOOLS], parser.args_key)
        grammar = "start: body\n" + parser.grammar(schema, "required", parallel=True)
        ok = Constraint("grammar", grammar)
        grammars.compile(ok)
        for sample, valid in ((text, True), (text.replace('"C"', '"K"'), False), ("plain words", False)):
            m = grammars.matcher(ok)
            assert m.consume_tokens(tool_tokenizer.encode(sample, add_special_tokens=False)) == valid, sample
            if valid:
                assert m.is_accepting()


def test_a_tool_result_in_the_history_renders_through_the_template(tool_tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS_1}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    plan = plan_chat(tool_tokenizer, messages, TOOLS, ("auto", None))
    assert (
        '"name": "get_weather"' in plan.prompt_text and ARGS_1 in plan.prompt_text
    )  # arguments as an object
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in plan.prompt_text
    assert plan.prompt_text.endswith("<|im_start|>assistant\n")


# -- end to end, every strategy ---------------------------------------------------------------------------
STRATEGIES = ["ar", "draft", "ngram", "mtp", "medusa"]


@pytest.fixture(scope="module")
def tool_server(tool_target):
    with running_server(model=tool_target, max_num_seqs=32) as s:
        yield s


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(base_url=tool_server[0] + "/v1", api_key="unused", max_retries=0)


def call_tools(client, strategy: str, stream: bool, **kw):
    body = dict(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}],
        tools=TOOLS,
        temperature=0,
        extra_body={"strategy": strategy} | kw.pop("extra_body", {}),
        **({"max_tokens": 120} | kw),
    )
    if not stream:
        r = client.chat.completions.create(**body)
        c = r.choices[0]
        calls = [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        return c.message.content, calls, c.finish_reason
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **body):
        c = chunk.choices[0]
        content += c.delta.content or ""
        for d in c.delta.tool_calls or []:
            if d.id:
                assert d.type == "function" and d.function.name and d.index not in calls
                calls[d.index] = [d.id, d.function.name, d.function.arguments or ""]
            else:
                calls[d.index][2] += d.function.arguments
        reason = c.finish_reason or reason
    return content or None, [tuple(calls[i]) for i in sorted(calls)], reason


def assert_valid(calls, names=None) -> None:
    assert calls
    for _, name, arguments in calls:
        assert names is None or name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_and_named_calls_validate_under_every_strategy_and_equal_ar(client, stream):
    seen = {}
    for strategy in STRATEGIES:
        content, calls, reason = call_tools(client, strategy, stream, tool_choice="required")
        assert reason == "tool_calls"
        assert_valid(calls)
        named = call_tools(
            client, strategy, stream, tool_choice={"type": "function", "function": {"name": "add"}}
        )
        assert named[2] == "tool_calls" and len(named[1]) == 1
        assert_valid(named[1], {"add"})
        single = call_tools(client, strategy, stream, tool_choice="required", parallel_tool_calls=False)
        assert len(single[1]) == 1
        assert_valid(single[1])
        seen[strategy] = [[(n, a) for _, n, a in x[1]] for x in ((content, calls, reason), named, single)]
    assert all(v == seen["ar"] for v in seen.values()), seen


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_auto_calls_are_constrained_once_opened_and_none_leaves_text(client, tool_server, stream):
    engine = tool_server[1].state.engine
    opener = engine.tokenizer.convert_tokens_to_ids("<tool_call>")
    seen = {}
    for strategy in STRATEGIES:
        # the random model never opens a call of its own accord: a bias opens one, the grammar does the rest
        content, calls, reason = call_tools(
            client, strategy, stream, tool_choice="auto", logit_bias={str(opener): 100}
        )
        assert reason == "tool_calls" and not content
        assert_valid(calls)
        plain = call_tools(client, strategy, stream, tool_choice="none", max_tokens=12)
        assert plain[1] == [] and plain[2] == "length" and plain[0]
        unbiased = call_tools(client, strategy, stream, max_tokens=12)  # auto, no opener: plain text
        seen[strategy] = (calls and [(n, a) for _, n, a in calls], plain[0], unbiased[0], unbiased[2])
    assert all(v == seen["ar"] for v in seen.values()), seen


def test_offline_chat_returns_tool_calls(tool_target):
    llm = LLM(tool_target)
    messages = [{"role": "user", "content": "2 + 3?"}]
    out = llm.chat(
        messages, SamplingParams(temperature=0, max_tokens=80), tools=TOOLS, tool_choice="required"
    ).outputs[0]
    assert out.finish_reason == "tool_calls"
    assert_valid([(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in out.tool_calls])


# -- reasoning ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def thinking_server(tool_target):
    with running_server(model=tool_target, max_num_seqs=32, reasoning_parser="deepseek_r1") as s:
        yield s


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


PERSON_JSON = Constraint.json_schema(PERSON)


def think_then_answer(base_url: str, strategy: str, bias: float, stream: bool, **kw):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    engine_ids = kw.pop("ids")
    body = dict(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Alice is 31. Extract her as JSON."}],
        temperature=0,
        max_tokens=80,
        extra_body={
            "strategy": strategy,
            "logit_bias": {str(engine_ids["</think>"]): bias},
        },
        **kw,
    )
    if not stream:
        m = client.chat.completions.create(**body).choices[0]
        extra = m.message.model_extra
        assert extra["reasoning"] == extra["reasoning_content"]
        return extra["reasoning_content"], m.message.content, m.finish_reason
    reasoning, content, reason = "", "", None
    for chunk in client.chat.completions.create(stream=True, **body):
        d = chunk.choices[0].delta
        extra = d.model_extra or {}
        reasoning += extra.get("reasoning_content") or ""
        content += d.content or ""
        reason = chunk.choices[0].finish_reason or reason
    return reasoning, content, reason


def test_reasoning_is_split_off_and_the_schema_applies_after_it_under_every_strategy(
    thinking_server, tool_target, monkeypatch
):
    base_url, app = thinking_server
    engine = app.state.engine
    ids = {t: engine.tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}

    # a bias on </think> that ends the thinking after a few tokens of the random model's own
    def thinks_a_while(b: float) -> bool:
        reasoning, _, reason = think_then_answer(base_url, "ar", b, False, ids=ids, response_format=fmt)
        return reason == "stop" and len(reasoning or "") > 4

    bias = next(b for b in (2, 4, 6, 8, 10, 14, 18, 24, 32) if thinks_a_while(b))
    seen = {}
    for strategy in STRATEGIES:
        for stream in (False, True):
            reasoning, content, reason = think_then_answer(
                base_url, strategy, bias, stream, ids=ids, response_format=fmt
            )
            assert reason == "stop" and reasoning and "</think>" not in reasoning
            jsonschema.validate(json.loads(content), PERSON)
            seen[(strategy, stream)] = (reasoning, content)
    assert len(set(seen.values())) == 1, seen  # greedy: the same under every strategy, streamed or not


def test_an_end_of_thinking_inside_an_accepted_draft_switches_the_schema_on(tool_target, monkeypatch):
    """A drafter that knows the answer's thinking, then drafts what the model says with no schema: the
    thinking and its end tag are accepted in one chain, the schema refuses the rest at once."""
    from branchwise.strategies import ngram

    llm = LLM(tool_target, reasoning_parser="deepseek_r1")
    end = llm.tokenizer.convert_tokens_to_ids("</think>")
    messages = [{"role": "user", "content": "Alice is 31. Extract her as JSON."}]
    prompt = llm.tokenizer.encode(plan_chat(llm.tokenizer, messages).prompt_text, add_special_tokens=False)

    def answer(strategy: str, bias: float, strategy_params: dict | None = None):
        params = SamplingParams(temperature=0, max_tokens=80, logit_bias={end: bias}, constraint=PERSON_JSON)
        return llm.chat(messages, params, strategy=strategy, strategy_params=strategy_params).outputs[0]

    def thinks_a_while(b: float) -> bool:
        out = answer("ar", b)
        return out.finish_reason == "stop" and len(out.reasoning or "") > 4

    bias = next(b for b in (2, 3, 3.5, 4, 5, 6, 8) if thinks_a_while(b))
    want = answer("ar", bias)
    at = want.token_ids.index(end) + 1
    free = llm.generate(prompt + want.token_ids[:at], SamplingParams(temperature=0, max_tokens=12))[0]
    assert free.outputs[0].token_ids[:3] != want.token_ids[at : at + 3]  # no schema: another answer
    oracle = want.token_ids[:at] + free.outputs[0].token_ids
    monkeypatch.setattr(ngram, "lookup", lambda tokens, k, **kw: oracle[len(tokens) - len(prompt) :][:k])
    strategy = llm.engine.strategy("ngram")
    verify, accepted_end = type(strategy).verify, []

    def watch(plans, out):
        verdicts = verify(strategy, plans, out)
        accepted_end.extend(
            end in p.drafts[: len(v.tokens) - 1] for p, v in zip(plans, verdicts, strict=True)
        )
        return verdicts

    monkeypatch.setattr(strategy, "verify", watch)
    # a fixed K: the adaptive controller, which reads step timings, may otherwise choose not to draft. Every
    # chain is accepted whole up to the end tag (the first one drafted right after the prompt), so output
    # token i is a chain's sampled token where (i + 1) % (K + 1) == 0: K puts the end tag among the drafts
    k = next(k for k in range(8, 17) if at % (k + 1))
    got = answer("ngram", bias, {"num_speculative_tokens": k})
    assert any(accepted_end)
    assert got.token_ids == want.token_ids and got.reasoning == want.reasoning
    jsonschema.validate(json.loads(got.text), PERSON)


def test_thinking_turned_off_in_the_template_gives_plain_content(thinking_server):
    base_url, _ = thinking_server
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        max_tokens=8,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    ).choices[0]
    assert r.message.model_extra["reasoning_content"] is None and r.message.content


def test_reasoning_streams_split_at_every_point(tool_tokenizer):
    plan = plan_chat(tool_tokenizer, [{"role": "user", "content": "x"}], reasoning_parser="qwen3")
    assert isinstance(plan.reasoning, Qwen3Parser) and plan.think_state == "before"
    output = "<think>\nsome thought </thi and more</think>\n\nthe answer"
    assert read_output(plan, output)[:2] == ("\nsome thought </thi and more", "the answer")
    stream, reasoning, content = ChatStream(plan), "", ""
    for i, ch in enumerate(output):
        d = stream.feed(ch, final=i == len(output) - 1)
        reasoning += d.get("reasoning_content", "")
        content += d.get("content", "")
    assert (reasoning, content) == ("\nsome thought </thi and more", "the answer")


def test_calls_where_the_markers_are_plain_text_not_tokens(tiny_llama):
    """The tiny tokenizer has no `<tool_call>` token: the grammar matches the marker as text."""
    llm = LLM(tiny_llama)
    assert "<tool_call>" not in llm.tokenizer.get_added_vocab()
    messages = [{"role": "user", "content": "2 + 3?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = llm.chat(
            messages, SamplingParams(temperature=0, max_tokens=200), tools=TOOLS, tool_choice=choice
        )
        calls = out.outputs[0].tool_calls
        assert_valid([(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls])
        assert "<tool_call>" not in out.outputs[0].text


def test_a_budget_spent_while_thinking_ends_with_length(thinking_server):
    base_url, _ = thinking_server
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Alice is 31. Extract her as JSON."}],
        temperature=0,
        max_tokens=6,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    ).choices[0]
    assert (
        r.finish_reason == "length" and r.message.model_extra["reasoning_content"] and not r.message.content
    )
