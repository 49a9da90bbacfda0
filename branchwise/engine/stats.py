"""Step statistics: what the engine measures of its steps and hands to every strategy before the next."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def smoothed(old: float, new: float) -> float:
    """An exponentially weighted average (0.9 of the old value); the first sample is taken as it is."""
    return new if not old else 0.9 * old + 0.1 * new


class CostModel:
    """seconds ~= fixed + per_token * tokens, fitted online by exponentially weighted least squares."""

    def __init__(self, decay: float = 0.97) -> None:
        self.decay = decay
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.w, self.x, self.y = d * self.w + 1, d * self.x + tokens, d * self.y + seconds
        self.xx, self.xy = d * self.xx + tokens * tokens, d * self.xy + tokens * seconds

    def fit(self) -> tuple[float, float]:
        """(fixed, per_token) seconds; per_token is 0 until the token counts have varied."""
        if self.w == 0:
            return 0.0, 0.0
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        slope = (self.xy / self.w - mx * my) / var if var > 1e-6 * max(1.0, mx * mx) else 0.0
        slope = min(max(slope, 0.0), my / max(mx, 1.0))  # between free and all-proportional
        return my - slope * mx, slope


@dataclass
class StepStats:
    """Pushed to every strategy (`begin_step`) before the engine schedules step `step`."""

    step: int = 0
    goodput: float = 0.0  # tokens committed per second of step, smoothed
    seq_goodput: float = 0.0  # the same per sequence that sampled in the step, smoothed
    per_token: float = 0.0  # seconds one more fed token adds to the target forward (fitted)
    fixed: float = 0.0  # seconds of a target forward whatever it is fed (fitted with per_token)
    last_tokens: int = 0  # tokens the last step committed
    last_seconds: float = 0.0  # and how long it took
    last_fed: int = 0  # and how many tokens it fed the target
    last_prefilled: bool = False  # the last step carried prefill chunks (it says little about decoding)
    running: Counter = field(default_factory=Counter)  # running sequences per strategy name
    waiting: int = 0  # sequences waiting for admission

    def batch_goodput(self) -> float:
        """Tokens per second the running batch yields: the smoothed goodput, but at most its per-sequence
        rate times the sequences running or waiting (a drained batch is not judged by the full one before it,
        whose sequences shared a step's fixed cost) and at least what a plain step of it would yield.
        Sequences waiting count as running: the scheduler admits what it can."""
        n = sum(self.running.values()) + self.waiting
        cap = self.seq_goodput * n if self.seq_goodput else self.goodput
        return max(min(self.goodput, cap), self.plain_goodput())

    def plain_goodput(self) -> float:
        """Tokens per second a step of the running batch would yield with no drafts (from the fit): unlike
        the smoothed `goodput`, it follows the batch at once (a full batch right after a draining one)."""
        n = sum(self.running.values())  # no fixed cost fitted (a capped fit): no estimate, not infinity
        return n / (self.fixed + self.per_token * n) if n and self.fixed > 0 else 0.0
