"""The Responses API with the official client, and /tokenize, /detokenize, /v1/models/{id}, /version."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from test_server import running_server, wait_until_free

from branchwise.models.loader import load_tokenizer

ADD = {
    "type": "function",
    "name": "add",
    "description": "Add two integers",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tool_target):
    with running_server(model=tool_target, max_num_seqs=16) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def model_of(client) -> str:
    return client.models.list().data[0].id


def test_a_plain_response_and_its_stored_copy(client, server):
    r = client.responses.create(
        model=model_of(client),
        input="Hello there",
        instructions="Be brief.",
        max_output_tokens=12,
        temperature=0,
    )
    assert r.object == "response" and r.output_text and r.status in ("completed", "incomplete")
    assert r.usage.output_tokens > 0 and r.usage.input_tokens > 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    again = httpx.get(f"{server[0]}/v1/responses/{r.id}").json()
    assert again["output"][0]["content"][0]["text"] == r.output_text
    chat = client.chat.completions.create(
        model=model_of(client),
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=12,
        temperature=0,
    )
    assert chat.choices[0].message.content == r.output_text  # the same prompt as chat gives


def test_streamed_events_come_in_openais_order_and_add_up(client):
    body = dict(model=model_of(client), input="Count to three", max_output_tokens=16, temperature=0)
    whole = client.responses.create(**body)
    events = list(client.responses.create(stream=True, **body))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == sorted({e.sequence_number for e in events})
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text


def test_text_format_json_schema_holds(client):
    r = client.responses.create(
        model=model_of(client),
        input="Alice is 31. Extract her.",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
        max_output_tokens=60,
    )
    jsonschema.validate(json.loads(r.output_text), PERSON)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_function_call_then_its_output_with_previous_response_id(client, server, stream):
    body = dict(
        model=model_of(client), input="What is 2 + 3?", tools=[ADD], tool_choice="required", temperature=0
    )
    if stream:
        events = list(client.responses.create(stream=True, **body))
        done = events[-1].response
        call = next(item for item in done.output if item.type == "function_call")
        deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
        assert "".join(e.delta for e in deltas if e.item_id == call.id) == call.arguments
        assert "response.function_call_arguments.done" in [e.type for e in events]
    else:
        done = client.responses.create(**body)
        call = next(item for item in done.output if item.type == "function_call")
    assert call.name == "add"
    jsonschema.validate(json.loads(call.arguments), ADD["parameters"])
    follow = client.responses.create(
        model=model_of(client),
        previous_response_id=done.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "5"}],
        max_output_tokens=8,
        temperature=0,
    )
    assert follow.previous_response_id == done.id and follow.output
    wait_until_free(server[0])


def test_unknown_ids_and_tool_types_are_4xx(client):
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=model_of(client), input="x", previous_response_id="resp_nope")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=model_of(client), input="x", tools=[{"type": "web_search"}])
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")


def test_tokenize_detokenize_and_model_routes(server, tool_target):
    base_url, _ = server
    tok = load_tokenizer(tool_target)
    text = "def f(x):\n    return x + 1"
    r = httpx.post(base_url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    assert httpx.post(base_url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == text
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(base_url + "/tokenize", json={"messages": messages}).json()
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok.encode(want, add_special_tokens=False)
    assert httpx.post(base_url + "/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert httpx.post(base_url + "/tokenize", json={"prompt": "x", "messages": messages}).status_code == 400
    models = httpx.get(base_url + "/v1/models").json()["data"][0]
    assert httpx.get(f"{base_url}/v1/models/{models['id']}").json()["id"] == models["id"]
    assert httpx.get(base_url + "/v1/models/not-this-one").status_code == 404
    assert httpx.get(base_url + "/version").json()["version"]


def test_input_items_become_the_chat_conversation():
    from branchwise.server.responses import ResponsesRequest, chat_messages

    A = '{"a": 2, "b": 3}'

    req = ResponsesRequest(
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "2 + 3?"}]},
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "add them"}]},
            {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": A},
            {"type": "function_call_output", "call_id": "call_1", "output": "5"},
        ],
        instructions="Use tools.",
    )
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}]
    assert chat_messages(req, history) == history + [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "2 + 3?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "add them",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "add", "arguments": A}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
