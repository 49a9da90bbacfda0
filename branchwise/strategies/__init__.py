"""Decoding strategies, one file each, all behind the interface in `base.py`.

Installed packages add strategies through the entry point group `branchwise.strategies` (name -> a
`Strategy` subclass); the built-in names win over an installed one of the same name.
"""

from importlib.metadata import entry_points

from branchwise.strategies.base import Resources, Strategy
from branchwise.strategies.draft import DraftStrategy
from branchwise.strategies.eagle3 import Eagle3Strategy
from branchwise.strategies.medusa import MedusaStrategy
from branchwise.strategies.mtp import MTPStrategy
from branchwise.strategies.multiverse import MultiverseStrategy
from branchwise.strategies.ngram import NgramStrategy
from branchwise.strategies.suffix import SuffixStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "ar": Strategy,
    "draft": DraftStrategy,
    "ngram": NgramStrategy,
    "suffix": SuffixStrategy,
    "mtp": MTPStrategy,
    "eagle3": Eagle3Strategy,
    "medusa": MedusaStrategy,
    "multiverse": MultiverseStrategy,
}
ALIASES = {"autoregressive": "ar", "prompt_lookup": "ngram", "speculative": "draft"}
ENTRY_POINTS = "branchwise.strategies"


def registry() -> dict[str, type[Strategy]]:
    """Every strategy there is: the built-in ones, then the installed ones."""
    found = dict(STRATEGIES)
    for ep in entry_points(group=ENTRY_POINTS):
        if ep.name not in found:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Strategy)):
                raise TypeError(f"entry point {ep.name!r} of {ENTRY_POINTS} is not a Strategy subclass")
            found[ep.name] = cls
    return found


def strategy_class(name: str) -> type[Strategy]:
    name = ALIASES.get(name, name)
    found = registry()
    if name not in found:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(found)}")
    return found[name]


__all__ = ["Resources", "Strategy", "STRATEGIES", "registry", "strategy_class"]
