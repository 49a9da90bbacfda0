"""Grammar constraints (JSON schema, regex, choice, Lark) matched by llguidance.

A request's `Constraint` compiles once per distinct spec (cached) into an llguidance grammar; each
sequence gets its own matcher. Strategies ask for allowed-token masks at the positions they sample or
verify, the engine advances the matcher on committed tokens and appends grammar-forced runs
(jump-forward) without sampling them.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.torch
import torch

KINDS = ("json", "json_object", "regex", "choice", "grammar")
ANY_JSON_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match: `value` is a schema (JSON text), regex, choices or Lark."""

    kind: str
    value: str = ""
    lenient: bool = False  # ignore schema keywords llguidance cannot enforce (the response reports which)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown constraint kind {self.kind!r}; choose from {list(KINDS)}")

    @staticmethod
    def json_schema(schema: dict | bool | None, lenient: bool = False) -> Constraint:
        return Constraint("json", json.dumps(ANY_JSON_OBJECT if schema is None else schema), lenient)

    @staticmethod
    def choice(options: list[str]) -> Constraint:
        if not options or not all(isinstance(o, str) for o in options):
            raise ValueError("choice must be a non-empty list of strings")
        return Constraint("choice", json.dumps(options))


class Grammars:
    """One model's tokenizer as llguidance sees it, a cache of compiled grammars, and mask helpers."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], cache_size: int = 256) -> None:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_token_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.executor = llguidance.LLExecutor()
        self._cache: OrderedDict[Constraint, tuple[str, list[str]]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> tuple[str, list[str]]:
        """(grammar, warnings) of a constraint; ValueError naming what cannot be enforced."""
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._cache[constraint]
        grammar = _grammar(constraint)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"invalid {constraint.kind} constraint: {messages[0]}")
        with self._lock:
            self._cache[constraint] = (grammar, messages)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar, messages

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        grammar, _ = self.compile(constraint)
        m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"invalid {constraint.kind} constraint: {m.get_error()}")
        return m

    def masks(self, matchers: list[llguidance.LLMatcher], drafts: list[list[int]]) -> torch.Tensor:
        """(sum of len(draft) + 1, V/32) int32 bitmasks: for each matcher, the mask after each prefix of its
        draft (the matcher advances through the draft and rolls back; drafts must be valid)."""
        rows = sum(len(d) + 1 for d in drafts)
        bitmask = llguidance.torch.allocate_token_bitmask(rows, self.vocab_size)
        plain, drafted, at = [], [], 0
        for m, d in zip(matchers, drafts, strict=True):
            if d:
                drafted.append((m, at, list(d)))
            else:
                plain.append((m, at))
            at += len(d) + 1
        if plain:
            llguidance.torch.fill_next_token_bitmask_par(self.executor, plain, bitmask)
        if drafted:
            llguidance.torch.fill_next_token_bitmask_par_with_draft_tokens(self.executor, drafted, bitmask)
        return bitmask


def unpack(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """(R, V/32) int32 bitmasks -> (R, V) bool, unpacked on `device` (a plain eager op)."""
    words = bitmask.to(device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=device)
    return ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def _grammar(c: Constraint) -> str:
    if c.kind in ("json", "json_object"):
        schema = json.loads(c.value) if c.kind == "json" else ANY_JSON_OBJECT
        # compact layout: no free whitespace, so a model cannot pad an object forever
        options = {"whitespace_flexible": False, "lenient": c.lenient}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except ValueError as e:
            raise ValueError(f"invalid JSON schema: {e}") from e
    if c.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(c.value)
    if c.kind == "choice":  # exactly one of the strings, as vLLM's guided_choice
        options = json.loads(c.value)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
    return llguidance.LLMatcher.grammar_from_lark(c.value)
