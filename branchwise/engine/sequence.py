"""Requests' sequences, their sampling parameters and the per-step outputs the engine emits."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from branchwise.constraints import Constraint

GREEDY_BELOW = 1e-5  # a temperature below this is greedy decoding (vLLM's rule): 1/T would overflow
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # outside it, penalised logits leave float range
SEED_RANGE = (-(2**63), 2**63 - 1)


class InvalidRequest(ValueError):
    """A request the engine refuses, naming the parameter at fault (the server's 400 `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """What a client may ask of one completion (vLLM's names and defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's plus the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (no prefix cache)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    constraint: Constraint | None = None  # a grammar the output must match (JSON schema, regex, ...)
    # "delta": each step's update carries the text its tokens added; "final_only": the whole text comes with
    # the last update (vLLM's RequestOutputKind; the offline API and non-streaming requests ask for it), and
    # a request without stop strings is then detokenized once, at its end, not token by token
    output_kind: str = "delta"

    def __post_init__(self) -> None:
        """Checks what needs no model; the engine checks token ids and top_k against the vocabulary."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k < 0:
            self.top_k = 0
        floats = [self.temperature, self.top_p, self.min_p, self.presence_penalty, self.frequency_penalty]
        floats += [self.repetition_penalty, *self.logit_bias.values()]
        low, high = REPETITION_PENALTY_RANGE
        checks = [
            (all(math.isfinite(x) for x in floats), None, "sampling parameters must be finite numbers"),
            (self.n >= 1, "n", "n must be at least 1"),
            (self.temperature >= 0, "temperature", "temperature must be non-negative"),
            (0 < self.top_p <= 1, "top_p", "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p", "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
            (
                low <= self.repetition_penalty <= high,
                "repetition_penalty",
                f"repetition_penalty must be in [{low}, {high}]",
            ),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "min_tokens must be non-negative"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"min_tokens must be at most max_tokens ({self.max_tokens})",
            ),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "logprobs must be in [0, 20]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs",
                "prompt_logprobs must be in [0, 20]",
            ),
            (all(s for s in self.stop), "stop", "stop strings must be non-empty"),
            (
                self.output_kind in ("delta", "final_only"),
                "output_kind",
                "output_kind must be delta or final_only",
            ),
            (
                all(-100 <= b <= 100 for b in self.logit_bias.values()),
                "logit_bias",
                "logit_bias values must be in [-100, 100]",
            ),
            (
                self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                "seed",
                "seed must fit in 64 bits",
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequest(message, param)
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def processes_logits(self) -> bool:
        """Logits pass through `sampler.apply_penalties` (bias, penalties, min_tokens) before sampling."""
        return bool(
            self.logit_bias
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )  # has_penalties spelled out: read per sequence per step, and a property call costs more


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # waiting for its Multiverse paths to merge back, holding its blocks
    FINISHED = "finished"


# the members as module constants: in Python 3.11 a member lookup on an Enum class costs 4x a global's,
# and hot paths check a status per sequence per step
RUNNING, FINISHED = Status.RUNNING, Status.FINISHED


@dataclass
class Sequence:
    """One completion: its tokens, how many of them have K/V in the cache, and its block table."""

    seq_id: int
    request_id: str
    index: int  # choice index within its request (n > 1)
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    strategy: str
    generator: torch.Generator
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V is in the cache; tokens[num_computed:] are fed next
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    forks: list[Sequence] = field(default_factory=list)  # n > 1: siblings born when the prefill ends
    strategy_params: dict = field(default_factory=dict)  # the request's, as the strategy parsed them
    strategy_state: Any = None  # owned by the sequence's strategy; reset on preemption
    matcher: Any = None  # llguidance matcher of params.constraint, advanced on committed tokens
    parent: Sequence | None = None  # a hidden sequence a strategy spawned (a Multiverse path) has one
    root: Sequence | None = None  # the top-level sequence above a hidden one (its request's)
    children: list[Sequence] = field(default_factory=list)  # hidden sequences spawned from this one
    position_offset: int = 0  # position = KV index + offset (after merged parallel paths)
    max_cacheable: int | None = None  # tokens whose K/V a later request may reuse (None: all)
    swapped: Any = None  # preempted with K/V no causal recompute gives back: see Scheduler._swap_out
    stop_ids: frozenset[int] | None = None  # the tokens that end it (`LLMEngine.stop_token_ids`)
    # detokenisation
    output_text: str = ""
    num_text_sent: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    decode_stream: Any = None  # tokenizers' DecodeStream of the output, where the tokenizer allows one
    text_at_end: bool = False  # detokenized once when it ends (final_only, no stop strings)
    # accounting
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict] = field(default_factory=list)  # of prompt tokens 1.., as they are computed
    num_drafted: int = 0
    num_accepted: int = 0
    num_draft_steps: int = 0
    num_forced: int = 0  # tokens appended by grammar jump-forward, not sampled
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache
    num_cached_blocks: int = 0  # leading blocks already offered to the prefix cache
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache; 1 means the sequence is ready to decode."""
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is FINISHED

    @property
    def hidden(self) -> bool:
        """A spawned sequence: it streams nothing of its own and ends with its request."""
        return self.parent is not None

    @property
    def top(self) -> Sequence:
        """The top-level sequence of this one's request (itself, unless hidden)."""
        return self.root or self


@dataclass(slots=True)  # one per sequence and step
class SeqUpdate:
    """What one step added to one sequence: the unit the engine streams out."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_prompt: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    num_draft_steps: int = 0
    num_forced: int = 0
    error: str | None = None
    prompt_logprobs: list[dict] = field(default_factory=list)  # computed this step (prompt tokens 1..)


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    num_draft_steps: int = 0  # speculative steps, drafted and accepted tokens of this output
    num_drafted: int = 0
    num_accepted: int = 0
    num_forced: int = 0  # tokens appended by grammar jump-forward
    reasoning: str | None = None  # LLM.chat with a reasoning parser: the think text (not in `text`)
    tool_calls: list[dict] | None = None  # LLM.chat with tools: OpenAI's tool_calls


@dataclass
class RequestOutput:
    """A finished (or, while streaming, partial) request as the offline API returns it."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    usage: dict = field(default_factory=dict)
