"""Decoding strategies, one file each, all behind the interface in `base.py`."""

from branchwise.strategies.base import Plan, Strategy, Verdict

STRATEGIES: dict[str, type[Strategy]] = {"ar": Strategy}
ALIASES = {"autoregressive": "ar"}


def strategy_class(name: str) -> type[Strategy]:
    name = ALIASES.get(name, name)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["Plan", "Strategy", "Verdict", "STRATEGIES", "strategy_class"]
