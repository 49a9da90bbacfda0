"""Replicas: two `branchwise serve` processes behind SGLang's cache-aware router, on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url} exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def served(url: str) -> float:
    """Requests a replica finished, from its own /metrics."""
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("branchwise:request_success_total")
    )


def test_two_replicas_behind_the_router_serve_and_survive_one_dying(tiny_llama):
    pytest.importorskip("sglang_router")
    procs, workers = [], []
    try:
        for _ in range(2):
            port = free_port()
            cmd = [
                "branchwise",
                "serve",
                tiny_llama,
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--log-level",
                "warning",
            ]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            workers.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(workers, procs, strict=True):
            wait_healthy(url, proc)
        port = free_port()
        router = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers]
        router += ["--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]
        router += ["--prometheus-port", str(free_port()), "--log-level", "warn"]
        procs.append(subprocess.Popen(router, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, procs[-1], 60)
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        body = dict(model=tiny_llama, max_tokens=8, temperature=0)
        want = [client.completions.create(prompt=f"def f{i}(x):", **body).choices[0].text for i in range(8)]
        assert all(served(w) > 0 for w in workers)  # both replicas took requests
        chat = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **body)
        assert chat.choices[0].message.content is not None  # the router's SGLang fields are accepted
        procs[1].kill()
        procs[1].wait()
        again = [client.completions.create(prompt=f"def f{i}(x):", **body).choices[0].text for i in range(8)]
        assert again == want  # every request still answered, by the surviving replica
    finally:
        for p in procs:
            p.kill()
            p.wait()


def serve_two_ranks(model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = ["branchwise", "serve", model, "-tp", "2", "--port", str(port), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url


def test_serve_on_two_ranks_answers_and_every_rank_exits_with_the_server(tiny_llama):
    import psutil

    from branchwise import LLM, SamplingParams

    want = LLM(tiny_llama).generate("def f(x):", SamplingParams(max_tokens=16, temperature=0))
    proc, url = serve_two_ranks(tiny_llama)
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len(ranks) == 1  # rank 1; rank 0 is the server's own process
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model=tiny_llama, prompt="def f(x):", max_tokens=16, temperature=0)
        assert got.choices[0].text == want[0].outputs[0].text
        proc.terminate()  # a clean stop: the server tells every rank to stop and waits for it
        proc.wait(60)  # (uvicorn re-raises SIGTERM once it has shut down: the code is -15 either way)
        assert not any(r.is_running() for r in ranks)  # gone before the server, not a second later
    finally:
        proc.kill()
    proc, url = serve_two_ranks(tiny_llama)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    try:
        ranks[0].kill()  # a rank dies: the server says so, for a router or Kubernetes to act on
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 503
    finally:
        proc.kill()
    proc.wait()
    proc, url = serve_two_ranks(tiny_llama)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()  # no clean stop: each rank notices its parent is gone
    proc.wait()
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive
