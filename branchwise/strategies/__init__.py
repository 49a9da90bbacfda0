"""Decoding strategies, one file each, all behind the interface in `base.py`."""

from branchwise.strategies.base import Plan, Strategy, Verdict
from branchwise.strategies.draft import DraftStrategy
from branchwise.strategies.medusa import MedusaStrategy
from branchwise.strategies.mtp import MTPStrategy
from branchwise.strategies.multiverse import MultiverseStrategy
from branchwise.strategies.ngram import NgramStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "ar": Strategy,
    "draft": DraftStrategy,
    "ngram": NgramStrategy,
    "mtp": MTPStrategy,
    "medusa": MedusaStrategy,
    "multiverse": MultiverseStrategy,
}
ALIASES = {"autoregressive": "ar", "prompt_lookup": "ngram", "speculative": "draft"}


def strategy_class(name: str) -> type[Strategy]:
    name = ALIASES.get(name, name)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["Plan", "Strategy", "Verdict", "STRATEGIES", "strategy_class"]
