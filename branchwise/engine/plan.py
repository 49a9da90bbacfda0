"""What strategies and the engine exchange in a step: Plans in, the forward's output, Verdicts out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from branchwise.engine.sequence import Sequence


@dataclass
class Plan:
    """The tokens one sequence feeds the target this step."""

    seq: Sequence
    tokens: list[int]  # the sequence's pending tokens, then any drafted tokens
    num_logits: int = 1  # logits wanted for the last num_logits fed tokens
    prompt_rows: int = 0  # the first of those rows score prompt tokens (prompt_logprobs), never sample
    positions: list[int] | None = None  # None: consecutive from `start`
    mask: torch.Tensor | None = None  # (n, n) bool intra-step mask; None: causal
    start: int | None = None  # KV index of tokens[0]; None: seq.num_computed
    first_block: int = 0  # attend only to K/V from this block of the sequence on (MTP after a cache hit)
    drafts: list[int] = field(default_factory=list)  # drafted chain (the tail of `tokens`)
    draft_probs: torch.Tensor | None = None  # (len(drafts), V) drafter distribution, None if deterministic
    draft_masks: torch.Tensor | None = None  # (len(drafts), V/32) grammar bitmask rows the drafter used
    payload: Any = None  # strategy-owned (e.g. a tree's retrieve indices)

    def __post_init__(self) -> None:
        if self.start is None:
            self.start = self.seq.num_computed


@dataclass
class Verdict:
    """What verification decided for one sequence."""

    tokens: list[int]  # new tokens in order: accepted drafts, then the one sampled token
    logit_rows: list[int]  # the logits row that scored each new token (for logprobs)
    kv_keep: list[int]  # offsets into plan.tokens whose K/V stays, in sequence order


@dataclass
class ForwardOutput:
    """One forward over packed plans; row lists are per plan, in the order the plans were given."""

    logits: torch.Tensor  # (R, V) float32, rows of every plan's last num_logits tokens, plan by plan
    hidden: torch.Tensor  # (R, H) final-normed hidden states of the same rows
    hidden_all: torch.Tensor  # (T, H) of every fed token (MTP modules read them)
    logits_rows: list[int]  # plan i's first row in `logits` / `hidden`
    token_rows: list[int]  # plan i's first token's row in `hidden_all`
    aux_hidden: torch.Tensor | None = None  # (T, k H) residual streams entering captured layers (EAGLE-3)

    def of(self, indices: list[int]) -> ForwardOutput:
        """The same tensors, with the rows of the plans at `indices` (a strategy's group) in that order."""
        rows, tokens = self.logits_rows, self.token_rows
        return ForwardOutput(
            self.logits,
            self.hidden,
            self.hidden_all,
            [rows[i] for i in indices],
            [tokens[i] for i in indices],
            self.aux_hidden,
        )
