"""Grammar constraints (JSON schema, regex, choice, Lark) matched by llguidance.

A request's `Constraint` compiles once per distinct spec (cached) into an llguidance grammar; each
sequence gets its own matcher. Strategies ask for allowed-token masks at the positions they sample or
verify, the engine advances the matcher on committed tokens and appends grammar-forced runs
(jump-forward) without sampling them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
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

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        eos_token_ids: set[int],
        budget_seconds: float = 2.0,
        cache_size: int = 256,
    ) -> None:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_token_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.eos = eos
        self.budget_seconds = budget_seconds
        # llguidance's own work limits, without its parser state in error messages (clients see them)
        self.limits = llguidance.LLParserLimits(verbose_errors=False)
        self.executor = llguidance.LLExecutor()
        # a spec -> (grammar, warnings, a matcher at its start), or the ValueError it raised: a bad spec sent
        # again costs nothing, and a sequence's matcher is a copy (40x cheaper than parsing the grammar
        # again, and its first masks reuse the lexer states the copy shares)
        self._cache: OrderedDict[Constraint, tuple[str, list[str], llguidance.LLMatcher] | ValueError] = (
            OrderedDict()
        )
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> tuple[str, list[str]]:
        """(grammar, warnings) of a constraint; ValueError naming what cannot be enforced.

        A grammar counts as compiled once its first two masks are computed (llguidance builds its lexer
        lazily, so a grammar past its limits fails there, not before), within `budget_seconds`.
        """
        return self._compiled(constraint)[:2]

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A new matcher at the start of the constraint's grammar (compiled first if it is not cached)."""
        start = self._compiled(constraint)[2]
        with self._lock:
            return start.deep_copy()

    def _compiled(self, constraint: Constraint) -> tuple[str, list[str], llguidance.LLMatcher]:
        with self._lock:
            found = self._cache.get(constraint)
            if found is not None:
                self._cache.move_to_end(constraint)
        if found is None:
            try:
                found = self._compile(constraint)
            except ValueError as e:
                found = e
            with self._lock:
                self._cache[constraint] = found
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(found, ValueError):
            raise found
        return found

    def _compile(self, constraint: Constraint) -> tuple[str, list[str], llguidance.LLMatcher]:
        started = time.perf_counter()
        try:
            grammar = _grammar(constraint)
        except ValueError:
            raise
        except Exception as e:  # e.g. text the grammar library cannot take (a lone surrogate)
            raise ValueError(f"invalid {constraint.kind} constraint: {e}") from e
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer, limits=self.limits
        )
        if is_error:
            raise ValueError(f"invalid {constraint.kind} constraint: {_first_line(messages[0])}")
        start = self._probe(constraint, grammar)
        took = time.perf_counter() - started
        if took > self.budget_seconds:
            raise ValueError(
                f"the {constraint.kind} constraint took {took:.1f} s to compile, more than this server "
                f"allows ({self.budget_seconds} s, --max-constraint-seconds): simplify it"
            )
        return grammar, messages, start

    def _probe(self, constraint: Constraint, grammar: str) -> llguidance.LLMatcher:
        """The first mask, one allowed token consumed, and the mask after it: errors become ValueErrors.
        Returns the matcher, back at the grammar's start."""
        m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        bitmask = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
        for _ in range(2):
            if not m.is_error():
                llguidance.torch.fill_next_token_bitmask(m, bitmask, 0)
            if m.is_error():
                error = _first_line(m.get_error())
                raise ValueError(f"the {constraint.kind} constraint cannot be enforced: {error}")
            words = bitmask[0].numpy().view(np.uint32)
            nonzero = np.flatnonzero(words)
            if not len(nonzero):
                raise ValueError(f"the {constraint.kind} constraint allows no output at all")
            word = int(words[nonzero[0]])
            token = int(nonzero[0]) * 32 + (word & -word).bit_length() - 1
            if token == self.eos or m.is_stopped():
                break
            m.consume_token(token)
        if not m.reset() or m.is_error():  # not expected; a fresh parse is the same start
            m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        return m

    def masks(
        self,
        matchers: list[llguidance.LLMatcher],
        drafts: list[list[int]],
        known: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """(sum of len(draft) + 1, V/32) int32 bitmasks: for each matcher, the mask after each prefix of its
        draft (the matcher advances through the draft and rolls back; drafts must be valid). known[i], if
        given, holds matcher i's first len(draft) rows already (a drafter computed them): only the last
        is computed."""
        rows = sum(len(d) + 1 for d in drafts)
        bitmask = llguidance.torch.allocate_token_bitmask(rows, self.vocab_size)
        plain, drafted, advanced, at = [], [], [], 0
        for i, (m, d) in enumerate(zip(matchers, drafts, strict=True)):
            if d and known is not None and known[i] is not None and _advance(m, d):
                bitmask[at : at + len(d)] = known[i]
                advanced.append((m, len(d)))
                plain.append((m, at + len(d)))
            elif d:
                drafted.append((m, at, list(d)))
            else:
                plain.append((m, at))
            at += len(d) + 1
        try:
            if plain:
                llguidance.torch.fill_next_token_bitmask_par(self.executor, plain, bitmask)
        finally:
            for m, n in advanced:
                m.rollback(n)
        if drafted:
            llguidance.torch.fill_next_token_bitmask_par_with_draft_tokens(self.executor, drafted, bitmask)
        return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of (..., V) logits with -inf wherever the (..., V/32) int32 bitmask's bit is 0 (bit j of word w
    allows token 32 w + j)."""
    vocab = logits.shape[-1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        # numpy's unpackbits and where are vectorized on the CPU, torch's bool-mask ops are not (4x here);
        # the words' bytes, least significant first (a little-endian host), hold tokens in order
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, count=vocab, bitorder="little")
        return torch.from_numpy(np.where(allowed.view(bool), logits.numpy(), np.float32(-np.inf)))
    words = bitmask.to(logits.device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words[..., None] >> bits) & 1).bool().flatten(-2)[..., :vocab]
    return logits.masked_fill(~allowed, float("-inf"))


def as_lark(c: Constraint) -> str:
    """The constraint as the right-hand side of a Lark rule, to compose with other rules (reasoning, tool
    calls); ValueError for a kind that does not compose (a whole Lark grammar)."""
    if c.kind in ("json", "json_object"):
        schema = json.loads(c.value) if c.kind == "json" else ANY_JSON_OBJECT
        if isinstance(schema, dict):
            schema = {"x-guidance": {"whitespace_flexible": False, "lenient": c.lenient}, **schema}
        return f"%json {json.dumps(schema)}"
    if c.kind == "regex":
        return f"/{llguidance.regex_to_lark(c.value)}/"
    if c.kind == "choice":
        return " | ".join(json.dumps(o) for o in json.loads(c.value))
    raise ValueError("a Lark grammar constraint does not combine with reasoning or tools; use a JSON schema")


def _advance(m: llguidance.LLMatcher, tokens: list[int]) -> bool:
    """Consume all of `tokens`, or none of them (False)."""
    n = m.try_consume_tokens(tokens)
    if n == len(tokens):
        return True
    m.rollback(n)
    return False


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


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
