"""Schemathesis fuzzes the API from its own /openapi.json: no 5xx, the server lives, every block returns."""

from __future__ import annotations

from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis import GenerationMode
from test_server import running_server, wait_until_free

EXAMPLES = 150  # per operation and mode: about 700 requests in all


@pytest.fixture(scope="module")
def fuzzed(tiny_llama):
    # a short context bounds how long any generated request may decode
    with running_server(model=tiny_llama, max_num_seqs=8, max_model_len=48, max_constraint_seconds=1.0) as s:
        yield s


def operations(base_url: str) -> list:
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_generated_requests_never_get_a_5xx_and_leave_every_block_back(fuzzed, mode):
    base_url, _ = fuzzed
    calls: list[int] = []
    for operation in operations(base_url):
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing to break: the GET routes take no input

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=EXAMPLES,
            derandomize=True,  # seeded: the same requests every run
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.generate],
        )
        def call(case):
            response = case.call(base_url=base_url, timeout=60)
            calls.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
            assert '"code": 500' not in response.text, (case.as_curl_command(), response.text[:500])

        call()
    assert len(calls) >= EXAMPLES  # hypothesis stops early only once it has tried every input
    print(f"{mode.value}: {len(calls)} requests, statuses {sorted(Counter(calls).items())}")
    r = httpx.post(base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
    wait_until_free(base_url, timeout=30)
