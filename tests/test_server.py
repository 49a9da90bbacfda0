"""The real server (uvicorn on loopback) talked to with the official `openai` client and raw httpx."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from branchwise import LLM, SamplingParams
from branchwise.config import ServerConfig
from branchwise.server.app import create_app
from branchwise.server.guard import uvicorn_config
from branchwise.strategies import STRATEGIES, Strategy


@contextlib.contextmanager
def running_server(**settings):
    """Start `branchwise serve` in-process on a free loopback port; yields (base_url, app)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(host="127.0.0.1", port=port, log_level="warning", **settings)
    app = create_app(config)
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_llama):
    with running_server(model=tiny_llama, max_num_seqs=64, max_num_batched_tokens=256) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def offline(tiny_llama):
    return LLM(tiny_llama)


def metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    return {
        s.name + str(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def metric(base_url: str, name: str) -> float:
    return sum(v for k, v in metrics(base_url).items() if k.startswith(name + "["))


async def read_stream(stream, close_after: int | None = None) -> str | None:
    """A streamed completion's text; None if the client went away after `close_after` chunks."""
    text, chunks = "", 0
    async for chunk in stream:
        text += chunk.choices[0].text
        chunks += 1
        if chunks == close_after:
            await stream.close()  # the client goes away mid-stream
            return None
    return text


def wait_until_free(base_url: str, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (
            metric(base_url, "branchwise:kv_cache_free_blocks")
            == metric(base_url, "branchwise:kv_cache_total_blocks")
            and metric(base_url, "branchwise:num_requests_running") == 0
        ):
            return
        time.sleep(0.05)
    raise AssertionError("KV blocks were not all freed")


GREEDY = dict(temperature=0, max_tokens=20, extra_body={"ignore_eos": True})


def test_completions_equal_the_offline_api_streamed_or_not(client, offline, tiny_llama):
    model = client.models.list().data[0].id
    assert model == tiny_llama
    want = offline.generate("def parse(", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    got = client.completions.create(model=model, prompt="def parse(", **GREEDY)
    assert got.choices[0].text == want.outputs[0].text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 20
    chunks = list(
        client.completions.create(
            model=model, prompt="def parse(", stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].choices == []
    by_ids = client.completions.create(model=model, prompt=want.prompt_token_ids, **GREEDY)
    assert by_ids.choices[0].text == want.outputs[0].text


def test_chat_equals_the_offline_api_streamed_or_not(client, offline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "list the files"}]
    prompt = offline.chat_prompt(messages)
    want = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[
        0
    ]
    got = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=messages,
        temperature=0,
        max_completion_tokens=20,
        extra_body={"ignore_eos": True},
    )
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=got.model,
        messages=messages,
        temperature=0,
        max_tokens=20,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_logprobs_stop_and_seed(client, offline):
    model = client.models.list().data[0].id
    out = client.completions.create(
        model=model,
        prompt="import os",
        n=2,
        temperature=1.0,
        seed=11,
        max_tokens=12,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1]
    for c in out.choices:
        # keyed by token text, so byte tokens that each decode to "\ufffd" may share one key
        assert len(c.logprobs.tokens) == 12 and all(1 <= len(t) <= 3 for t in c.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    for i, c in enumerate(out.choices):  # sample i follows seed + i, as the offline API does
        want = offline.generate(
            "import os", SamplingParams(temperature=1.0, seed=11 + i, max_tokens=12, ignore_eos=True)
        )[0].outputs[0]
        assert c.text == want.text
    full = client.completions.create(model=model, prompt="class A:", **GREEDY).choices[0].text
    stop = full[6:9]
    cut = client.completions.create(model=model, prompt="class A:", stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(x.top_logprobs) == 2 for x in content)


def test_64_streams_with_a_quarter_disconnecting_free_every_block(server, offline):
    base_url, _ = server
    prompts = [f"def function_{i}(x, y):" for i in range(64)]
    expected = [
        o.outputs[0].text
        for o in offline.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    ]

    async def one(client: openai.AsyncOpenAI, i: int) -> str | None:
        stream = await client.completions.create(
            model=client.model_name,
            prompt=prompts[i],
            stream=True,
            temperature=0,
            max_tokens=24,
            extra_body={"ignore_eos": True},
        )
        return await read_stream(stream, 3 if i % 4 == 0 else None)

    async def main() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        client.model_name = (await client.models.list()).data[0].id
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    before = metric(base_url, "branchwise:request_success_total")
    results = asyncio.run(main())
    for i, text in enumerate(results):
        if i % 4:
            assert text == expected[i]
    wait_until_free(base_url)
    ended = metric(base_url, "branchwise:request_success_total") - before
    assert ended == 64  # every request ended: 48 by length, 16 by abort
    aborted = sum(v for k, v in metrics(base_url).items() if "request_success_total" in k and "'abort'" in k)
    assert aborted >= 16


BAD = [
    ("/v1/completions", b"{not json", "Malformed JSON"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, "does not exist"),
    ("/v1/completions", {"prompt": list(range(200)) * 6}, "maximum context length"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, "maximum context length"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 100}, "max_num_seqs"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "strategy": "warp-drive"}, "unknown strategy"),
    ("/v1/completions", {"prompt": "x", "strategy": {"name": "ar", "params": {"k": 3}}}, "takes no params"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "logprobs"),
    ("/v1/nowhere", {"prompt": "x"}, "Not Found"),
]


@pytest.mark.parametrize("path,body,words", BAD, ids=[b[2] for b in BAD])
def test_bad_input_gets_a_4xx_in_openai_shape_and_the_server_keeps_serving(server, path, body, words):
    base_url, _ = server
    content = body if isinstance(body, bytes) else None
    r = httpx.post(
        base_url + path,
        content=content,
        json=None if content else body,
        headers={"content-type": "application/json"},
    )
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code
    assert words.lower() in (err["message"] + str(err["param"])).lower(), err
    ok = httpx.post(base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_metrics_parse_and_counters_move(server, client):
    base_url, _ = server
    before = metric(base_url, "branchwise:generation_tokens_total")
    prompt_before = metric(base_url, "branchwise:prompt_tokens_total")
    ttft_before = metric(base_url, "branchwise:time_to_first_token_seconds_count")
    client.completions.create(model=client.models.list().data[0].id, prompt="while True:", **GREEDY)
    assert metric(base_url, "branchwise:generation_tokens_total") - before == 20
    assert metric(base_url, "branchwise:prompt_tokens_total") > prompt_before
    assert metric(base_url, "branchwise:time_to_first_token_seconds_count") == ttft_before + 1
    names = {f.name for f in text_string_to_metric_families(httpx.get(base_url + "/metrics").text)}
    for name in [
        "branchwise:num_requests_running",
        "branchwise:num_requests_waiting",
        "branchwise:kv_cache_usage_perc",
        "branchwise:inter_token_latency_seconds",
        "branchwise:e2e_request_latency_seconds",
        "branchwise:prompt_tokens",
        "branchwise:generation_tokens",
    ]:
        assert name in names


def test_api_key_guards_v1_routes_but_not_health(tiny_llama):
    with running_server(model=tiny_llama, api_key="sesame") as (base_url, _):
        assert httpx.get(base_url + "/health").status_code == 200
        r = httpx.get(base_url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=base_url + "/v1", api_key="sesame")
        assert ok.completions.create(model=tiny_llama, prompt="x", max_tokens=2).choices[0].finish_reason


def test_a_full_queue_answers_503_with_retry_after(tiny_llama):
    with running_server(model=tiny_llama, max_queue=0) as (base_url, _):
        r = httpx.post(base_url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == 503


def test_request_timeout_aborts_and_frees_blocks(tiny_llama):
    with running_server(model=tiny_llama, request_timeout=0.3, max_num_seqs=4) as (base_url, _):
        r = httpx.post(
            base_url + "/v1/completions",
            json={"prompt": "x", "max_tokens": 1000, "ignore_eos": True, "n": 4},
            timeout=30,
        )
        assert r.status_code == 200
        assert {c["finish_reason"] for c in r.json()["choices"]} == {"abort"}
        wait_until_free(base_url)


class ExplodingStrategy(Strategy):
    name = "explode"

    def propose(self, seqs, budgets):
        raise RuntimeError("boom")


def test_a_failure_inside_one_request_ends_only_that_request(server, client, monkeypatch):
    base_url, _ = server
    monkeypatch.setitem(STRATEGIES, "explode", ExplodingStrategy)
    r = httpx.post(base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "strategy": "explode"})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    ok = client.completions.create(model=client.models.list().data[0].id, prompt="x", max_tokens=3)
    assert ok.choices[0].finish_reason == "length"
    wait_until_free(base_url)


def test_per_request_speculative_strategy_reports_its_usage_and_metrics(server, client, offline):
    prompt = "def parse(self, text):\n    return self.parse(text)\n\ndef parse"
    want = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    r = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        extra_body={
            "ignore_eos": True,
            "strategy": {"name": "ngram", "params": {"num_speculative_tokens": 3}},
        },
    )
    assert r.choices[0].text == want[0].outputs[0].text
    spec = r.usage.model_extra["spec_decode"]
    assert spec["num_drafts"] > 0 and spec["num_draft_tokens"] >= spec["num_accepted_tokens"]
    assert metric(server[0], "branchwise:spec_decode_num_drafts_total") >= spec["num_drafts"]


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_response_format_json_schema_and_json_object_round_trip(client):
    import json

    import jsonschema

    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Alice is 31. Extract name and age as JSON."}]
    r = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=80,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": PERSON, "strict": True},
        },
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.usage.model_extra["structured_output_forced_tokens"] > 0
    r = client.completions.create(
        model=model,
        prompt="data = ",
        max_tokens=120,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}, "guided_json": None},
    )
    assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].text), dict)


def test_vllm_structured_outputs_and_guided_fields(client):
    model = client.models.list().data[0].id
    r = client.completions.create(
        model=model, prompt="x", max_tokens=10, extra_body={"guided_choice": ["alpha", "beta"]}
    )
    assert r.choices[0].text in ("alpha", "beta")
    r = client.completions.create(
        model=model, prompt="x", max_tokens=20, extra_body={"structured_outputs": {"regex": "[0-9]{4}"}}
    )
    assert len(r.choices[0].text) == 4 and r.choices[0].text.isdigit()


def test_bad_schema_is_a_400_naming_the_keyword_and_lenient_mode_reports_it(server, client):
    model = client.models.list().data[0].id
    bad = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=5, extra_body={"response_format": fmt})
    assert "uniqueItems" in e.value.body["message"] and e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=model, prompt="x", extra_body={"guided_regex": "[0-9]+", "guided_choice": ["a"]}
        )
    fmt["json_schema"]["lenient"] = True
    r = httpx.post(
        server[0] + "/v1/completions",
        json={"prompt": "x", "max_tokens": 30, "response_format": fmt},
    ).json()
    assert r["structured_output"]["lenient"] is True
    assert any("uniqueItems" in w for w in r["structured_output"]["not_enforced"])
    wait_until_free(server[0])


def test_echo_and_prompt_logprobs_equal_a_dense_forward(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    # chunked prefill (16 tokens a step), and the prompt sent twice: the second must not take the prefix cache
    with running_server(model=tiny_llama, max_num_batched_tokens=16) as (base_url, app):
        tok = app.state.engine.tokenizer
        text = "def parse(self, text):\n    return [line.strip() for line in text.splitlines()]"
        ids = tok.encode(text)
        with torch.inference_mode():
            dense = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = [dense[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        for _ in range(2):
            body = {"prompt": text, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2}
            c = httpx.post(base_url + "/v1/completions", json=body | {"prompt_logprobs": 2}).json()[
                "choices"
            ][0]
            assert c["text"].startswith(text) and len(c["text"]) > len(text)
            lp = c["logprobs"]
            assert (
                lp["tokens"][: len(ids)] == [tok.decode([t]) for t in ids] and lp["token_logprobs"][0] is None
            )
            assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
            scored = c["prompt_logprobs"]
            assert scored[0] is None and len(scored) == len(ids)
            got = [scored[i + 1][str(ids[i + 1])]["logprob"] for i in range(len(ids) - 1)]
            assert got == pytest.approx(want, abs=1e-4)
            ranks = [scored[i + 1][str(ids[i + 1])]["rank"] for i in range(len(ids) - 1)]
            assert ranks == [int((dense[i] > dense[i, ids[i + 1]]).sum()) + 1 for i in range(len(ids) - 1)]
        wait_until_free(base_url)


def test_sglang_router_fields_are_honoured_or_refused(server, client, offline):
    """What SGLang's router adds to every request: its defaults are served, the rest honoured or a 400."""
    base = server[0]
    prompt = "def parse(self, text):"
    plain = offline.generate(offline.encode(prompt), SamplingParams(temperature=0, max_tokens=12))
    text = plain[0].outputs[0].text
    stop = text[4:7]
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": [stop]}
    trimmed = httpx.post(base + "/v1/completions", json=body | {"no_stop_trim": False}).json()
    kept = httpx.post(base + "/v1/completions", json=body | {"no_stop_trim": True}).json()
    assert kept["choices"][0]["text"] == trimmed["choices"][0]["text"] + stop  # == include_stop_str_in_output
    router_defaults = {
        "no_stop_trim": False,
        "ignore_eos": False,
        "continue_final_message": False,
        "skip_special_tokens": True,
        "separate_reasoning": True,
        "stream_reasoning": True,
        "return_hidden_states": False,
        "max_completion_tokens": 4,
    }
    chat = {"messages": [{"role": "user", "content": "hi"}]} | router_defaults
    assert httpx.post(base + "/v1/chat/completions", json=chat).status_code == 200
    bad = httpx.post(base + "/v1/chat/completions", json=chat | {"return_hidden_states": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "return_hidden_states"
    both = httpx.post(base + "/v1/chat/completions", json=chat | {"continue_final_message": True})
    assert both.status_code == 400 and "add_generation_prompt" in both.json()["error"]["message"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def f(x"}]
    cont = chat | {"messages": messages, "continue_final_message": True, "add_generation_prompt": False}
    want = offline.tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    got = httpx.post(base + "/tokenize", json={"prompt": want}).json()["count"]
    usage = httpx.post(base + "/v1/chat/completions", json=cont).json()["usage"]
    assert usage["prompt_tokens"] == got  # the last message extended, not closed
