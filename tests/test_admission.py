"""Bad input stops at admission with a 4xx in OpenAI's shape; the server and every other request go on."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import httpx
import pytest
from test_server import metric, running_server, wait_until_free

from branchwise.models.demo import ASSET_DIR
from branchwise.train.demo_data import arithmetic
from branchwise.train.eval import EVAL_SEED

CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
RECURSIVE = {
    "$ref": "#/$defs/a",
    "$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}},
}
# (route, body: a dict or raw bytes, status, words the error names) -- every class the fuzzing found
BAD = [
    (
        CMPL,
        {"prompt": "x", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [99999]},
        400,
        "stop_token_ids",
    ),
    (CMPL, {"prompt": "x", "top_k": 2**64 + 5}, 400, "top_k"),
    (CMPL, {"prompt": "x", "seed": 2**70}, 400, "seed"),
    (CMPL, {"prompt": "x", "logit_bias": {"99999": 5}}, 400, "logit_bias"),
    (CMPL, {"prompt": "x", "logit_bias": {"abc": 5}}, 400, "logit_bias"),
    (CMPL, {"prompt": "x", "max_tokens": 4, "min_tokens": 10}, 400, "min_tokens"),
    (CMPL, {"prompt": "x", "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    (CMPL, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    (CMPL, b'{"prompt": "x", "top_p": Infinity}', 400, "top_p"),
    (CMPL, b'{"prompt": "a\\ud800b", "max_tokens": 2}', 400, "prompt"),
    (CMPL, {"prompt": ["x"] * 1000, "n": 8}, 400, "max_num_seqs"),
    (CMPL, {"prompt": "x" * 1_000_000}, 400, "maximum context length"),
    (CMPL, {"prompt": "x", "guided_regex": "a{1000000}"}, 400, "guided_regex"),
    (CMPL, {"prompt": "x", "guided_regex": "((a{100}){100}){100}"}, 400, "guided_regex"),
    (CMPL, {"prompt": "x", "guided_choice": [f"option {i}" for i in range(10_000)]}, 400, "guided_choice"),
    (CMPL, {"prompt": "x", "structured_outputs": {"choice": 5}}, 400, "structured_outputs"),
    (CMPL, {"prompt": "x", "structured_outputs": {"regex": "[0-9]", "bogus": 1}}, 400, "bogus"),
    (
        CHAT,
        {"messages": USER, "response_format": {"type": "json_schema", "json_schema": 0.5}},
        400,
        "json_schema",
    ),
    (
        CHAT,
        {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": RECURSIVE}}},
        400,
        "response_format",
    ),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, 400, "text"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "text"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "image_url",
    ),
    (CHAT, {"messages": USER, "tools": [{"type": "web_search"}]}, 400, "tools"),
    (
        CHAT,
        {
            "messages": USER,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
        },
        400,
        "tools",
    ),
    (
        CHAT,
        {
            "messages": USER,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        400,
        "tool_choice",
    ),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "tool_call_id"),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    (CHAT, {"messages": USER, "unknown_field": 1}, 400, "unknown_field"),
    (CHAT, {"messages": USER, "logit_bias": {"1": 500}}, 400, "logit_bias"),
    (CMPL, {"prompt": "x" * (21 << 20)}, 413, "larger"),
]
IDS = [f"{i}-{words}" for i, (_, _, _, words) in enumerate(BAD)]


async def post(client: httpx.AsyncClient, route: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return await client.post(route, content=body, headers={"content-type": "application/json"})
    return await client.post(route, json=body)


def assert_openai_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert words.lower() in (err["message"] + str(err["param"])).lower(), err
    assert "<state>" not in err["message"] and "verbose" not in err["message"]  # no parser internals


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(model=tiny_llama, max_num_seqs=16, max_model_len=256) as s:
        yield s


@pytest.mark.parametrize("route,body,status,words", BAD, ids=IDS)
def test_each_bad_request_is_a_4xx_naming_its_parameter(server, route, body, status, words):
    async def main():
        async with httpx.AsyncClient(base_url=server[0], timeout=60) as client:
            assert_openai_error(await post(client, route, body), status, words)
            ok = await client.post(CMPL, json={"prompt": "x", "max_tokens": 2})
            assert ok.status_code == 200

    asyncio.run(main())


def test_a_huge_prompt_is_refused_before_it_is_tokenized(server, monkeypatch):
    engine = server[1].state.engine
    seen = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(
        engine.tokenizer, "encode", lambda text, **kw: seen.append(len(text)) or encode(text, **kw)
    )
    r = httpx.post(server[0] + CMPL, json={"prompt": "y" * 1_000_000}, timeout=30)
    assert r.status_code == 400 and not any(n >= 1_000_000 for n in seen)


def test_a_tiny_temperature_decodes_greedily(server):
    body = {"prompt": "def f(", "max_tokens": 12, "ignore_eos": True}
    greedy = httpx.post(server[0] + CMPL, json=body | {"temperature": 0}).json()["choices"][0]["text"]
    tiny = httpx.post(server[0] + CMPL, json=body | {"temperature": 1e-320}).json()["choices"][0]["text"]
    assert tiny == greedy


def test_logit_bias_bans_and_forces_tokens(server):
    engine = server[1].state.engine
    body = {"prompt": "def f(", "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    first = httpx.post(server[0] + CMPL, json=body | {"logprobs": 0}).json()
    banned = engine.tokenizer.encode(first["choices"][0]["text"])[0]
    r = httpx.post(server[0] + CMPL, json=body | {"logit_bias": {str(banned): -100}}).json()
    assert banned not in engine.tokenizer.encode(r["choices"][0]["text"])
    forced = httpx.post(server[0] + CMPL, json=body | {"logit_bias": {"7": 100}, "strategy": "ngram"}).json()
    assert engine.tokenizer.encode(forced["choices"][0]["text"]) == [7] * 6


def test_the_key_is_checked_before_the_body_and_guards_the_docs(tiny_llama):
    with running_server(model=tiny_llama, api_key="sesame") as (base_url, _):
        r = httpx.post(base_url + CMPL, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        for path in ("/openapi.json", "/docs", "/v1/models"):
            assert httpx.get(base_url + path).status_code == 401
            assert httpx.get(base_url + path, headers={"authorization": "Bearer sesame"}).status_code == 200
        assert httpx.get(base_url + "/health").status_code == 200
        assert httpx.get(base_url + "/metrics").status_code == 200


def test_bodies_over_the_limit_get_413_with_or_without_a_length(tiny_llama):
    with running_server(model=tiny_llama, max_request_bytes=4096) as (base_url, _):
        big = json.dumps({"prompt": "x" * 8000}).encode()
        r = httpx.post(base_url + CMPL, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == 413

        def chunks():  # chunked transfer: no content-length up front
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        r = httpx.post(base_url + CMPL, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert httpx.post(base_url + CMPL, json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_client_that_never_finishes_its_headers_is_cut_off(tiny_llama):
    with running_server(model=tiny_llama, http_timeout=0.5) as (base_url, _):
        port = int(base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
            s.settimeout(5)
            started = time.monotonic()
            assert s.recv(1024) == b""  # closed by the server
            assert time.monotonic() - started < 4
        assert httpx.get(base_url + "/health").status_code == 200


def test_kv_gauges_read_the_whole_cache_before_the_first_request(tiny_llama):
    with running_server(model=tiny_llama) as (base_url, app):
        total = metric(base_url, "branchwise:kv_cache_total_blocks")
        assert total == app.state.engine.num_blocks > 0
        assert metric(base_url, "branchwise:kv_cache_free_blocks") == total


def test_the_queue_counts_every_sequence_a_request_asks_for(tiny_llama):
    with running_server(model=tiny_llama, max_queue=3) as (base_url, _):
        r = httpx.post(base_url + CMPL, json={"prompt": "x", "n": 4, "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert httpx.post(base_url + CMPL, json={"prompt": "x", "n": 3, "max_tokens": 2}).status_code == 200


# -- poisoned neighbours: bad requests arrive while good ones run, for every strategy ------------------
@pytest.fixture(scope="module")
def demo_server():
    with running_server(model=str(ASSET_DIR), max_num_seqs=64) as s:
        yield s


@pytest.mark.parametrize("strategy", ["ar", "draft", "ngram", "mtp", "medusa", "multiverse"])
def test_bad_requests_in_flight_leave_every_other_request_as_it_would_be_alone(demo_server, strategy):
    base_url, _ = demo_server
    rng = random.Random(EVAL_SEED)
    questions = [arithmetic(rng)[0] for _ in range(8)]
    max_tokens = 200 if strategy == "multiverse" else 40

    def body(q: str) -> dict:
        messages = [{"role": "user", "content": q}]
        return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "strategy": strategy}

    async def innocent(client: httpx.AsyncClient, q: str) -> str:
        text = ""
        async with client.stream("POST", CHAT, json=body(q) | {"stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += chunk["choices"][0]["delta"].get("content") or ""
        return text

    async def main():
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            alone = [
                (await client.post(CHAT, json=body(q))).json()["choices"][0]["message"]["content"]
                for q in questions
            ]
            good = [asyncio.create_task(innocent(client, q)) for q in questions]
            await asyncio.sleep(0.2)  # the good ones are in flight
            bad = await asyncio.gather(*(post(client, route, b) for route, b, _, _ in BAD))
            for r, (_, _, status, words) in zip(bad, BAD, strict=True):
                assert_openai_error(r, status, words)
            assert await asyncio.gather(*good) == alone

    asyncio.run(main())
    wait_until_free(base_url)
