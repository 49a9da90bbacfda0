"""The strategy seam: every strategy works through its context alone; outside packages add strategies."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import httpx
import pytest
from test_server import running_server

from branchwise import LLM, SamplingParams
from branchwise.engine import context as context_module
from branchwise.engine import engine as engine_module
from branchwise.models.demo import ASSET_DIR
from branchwise.strategies import ENTRY_POINTS, Strategy, strategy_class

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
INTERFACE = {n for n in dir(context_module.StrategyContext) if not n.startswith("_")}


class Refusing:
    """The context as the interface promises it: its public members, read-only; anything else raises."""

    def __init__(self, engine) -> None:
        object.__setattr__(self, "_ctx", context_module.StrategyContext(engine))

    def __getattr__(self, name: str):
        if name not in INTERFACE:
            raise AttributeError(f"a strategy reached for {name!r}, which its context does not offer")
        return getattr(object.__getattribute__(self, "_ctx"), name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"a strategy tried to set {name!r} on its context")


def test_the_context_is_small():
    assert len(INTERFACE) <= 24, sorted(INTERFACE)


@pytest.mark.parametrize("strategy", ["ar", "draft", "ngram", "mtp", "medusa"])
def test_each_strategy_runs_through_a_context_that_refuses_everything_else(
    spec_target, prompts, strategy, monkeypatch
):
    monkeypatch.setattr(engine_module, "StrategyContext", Refusing)
    llm = LLM(spec_target)
    assert isinstance(llm.engine.strategy(strategy).ctx, Refusing)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts[:6], GREEDY, strategy="ar")]
    constrained = SamplingParams(temperature=0, max_tokens=40, constraint=json_constraint())
    got = [o.outputs[0].token_ids for o in llm.generate(prompts[:6], GREEDY, strategy=strategy)]
    assert got == want
    llm.generate(prompts[:2], constrained, strategy=strategy)  # grammars and masks through the context
    assert llm.engine.blocks.num_available == llm.engine.blocks.num_blocks


def test_multiverse_runs_through_a_context_that_refuses_everything_else(monkeypatch):
    monkeypatch.setattr(engine_module, "StrategyContext", Refusing)
    llm = LLM(str(ASSET_DIR), num_blocks=48)  # paths spawn, pause, merge and swap out under pressure
    from test_multiverse import chat, tasks

    prompts = [chat(llm, t[0]) for t in tasks(6)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=200), strategy="multiverse")
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    assert llm.engine.blocks.num_available == llm.engine.blocks.num_blocks


def json_constraint():
    from branchwise.constraints import Constraint

    return Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})


OUTSIDE = '''
"""A package of someone else's: two strategies for branchwise."""

from branchwise.engine.plan import Plan
from branchwise.strategies import Strategy


class Plain(Strategy):
    name = "plain"  # overrides nothing else: decodes exactly as ar


class RepeatLast(Strategy):
    """Drafts the last token k times; the chain rule keeps it lossless."""

    name = "repeat_last"

    def parse_params(self, params):
        return {"k": int(params.get("k", 3))}

    def lookahead(self, seq):
        return seq.strategy_params.get("k", 3)

    def propose(self, seqs, budgets):
        plans = []
        for seq, budget in zip(seqs, budgets):
            drafts = [seq.token_ids[-1]] * (budget - 1)
            pending = seq.token_ids[seq.num_computed :]
            plans.append(Plan(seq, pending + drafts, len(drafts) + 1, drafts=drafts))
        return plans
'''


@pytest.fixture
def outside_package(tmp_path, monkeypatch):
    """An installed package that registers strategies under the `branchwise.strategies` entry points."""
    (tmp_path / "outside_strategies.py").write_text(textwrap.dedent(OUTSIDE))
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [
        importlib.metadata.EntryPoint(name, f"outside_strategies:{cls}", ENTRY_POINTS)
        for name, cls in (("plain", "Plain"), ("repeat_last", "RepeatLast"))
    ]
    real = importlib.metadata.entry_points

    def entry_points(**selection):
        return points if selection.get("group") == ENTRY_POINTS else real(**selection)

    monkeypatch.setattr("branchwise.strategies.entry_points", entry_points)
    yield
    sys.modules.pop("outside_strategies", None)


def test_an_installed_package_adds_strategies_that_serve_like_any_other(outside_package, tiny_llama):
    assert strategy_class("plain").__mro__[1] is Strategy
    with running_server(model=tiny_llama, strategy="plain") as (base_url, _):
        body = {"prompt": "def parse(self, text):", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        ar = httpx.post(base_url + "/v1/completions", json=body | {"strategy": "ar"}).json()
        default = httpx.post(base_url + "/v1/completions", json=body).json()  # --strategy plain
        repeat = httpx.post(
            base_url + "/v1/completions",
            json=body | {"strategy": {"name": "repeat_last", "params": {"k": 4}}},
        ).json()
        assert default["choices"][0]["text"] == ar["choices"][0]["text"] == repeat["choices"][0]["text"]
        assert repeat["usage"]["spec_decode"]["num_drafts"] > 0  # it really drafted
        bad = httpx.post(base_url + "/v1/completions", json=body | {"strategy": "nope"}).json()
        assert "repeat_last" in bad["error"]["message"] and "medusa" in bad["error"]["message"]
