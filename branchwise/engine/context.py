"""The one thing a strategy receives: read-only facts about the engine, and verbs for what strategies do to
sequences. A strategy reaches nothing else of the engine; the scheduler alone touches its queues."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from branchwise.engine.kv_cache import new_pool
from branchwise.engine.model_runner import ModelRunner
from branchwise.engine.sequence import Sequence

if TYPE_CHECKING:
    from branchwise.engine.engine import LLMEngine


class StrategyContext:
    """Facts: `config`, `block_size`, `max_model_len`, `device`, `dtype`, `vocab_size`, `tokenizer`,
    `model_config` (the target's HF config), `model_name`, `metrics`, `eos_token_ids`. Queries:
    `grammars()`, `stop_token_ids(seq)`. Verbs: `add_pool`, `runner`, `capture_hidden`, `spawn`, `pause`,
    `resume`, `release`, `adopt_kv`, `append`, `finish`."""

    __slots__ = (
        "_engine",
        "config",
        "block_size",
        "max_model_len",
        "device",
        "dtype",
        "vocab_size",
        "tokenizer",
        "model_config",
        "model_name",
        "metrics",
        "eos_token_ids",
    )

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self.config = engine.config
        self.block_size = engine.config.block_size
        self.max_model_len = engine.max_model_len
        self.device, self.dtype = engine.device, engine.dtype
        self.vocab_size, self.tokenizer = engine.vocab_size, engine.tokenizer
        self.model_config = engine.model.config
        self.model_name, self.metrics = engine.model_name, engine.metrics
        self.eos_token_ids = frozenset(engine.eos_token_ids)

    # -- queries ----------------------------------------------------------------------------------
    def grammars(self):
        """The model's grammar compiler and mask helpers (`constraints.Grammars`)."""
        return self._engine.grammars()

    def stop_token_ids(self, seq: Sequence) -> frozenset[int]:
        return self._engine.stop_token_ids(seq)

    # -- resources --------------------------------------------------------------------------------
    def add_pool(self, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """A K/V pool of the strategy's own on the shared block tables: every copy, move, swap and
        rollback of a sequence's blocks applies to it too. Its bytes were budgeted from `Resources`."""
        e = self._engine
        pool = new_pool(
            num_layers, e.num_blocks, self.block_size, num_kv_heads, head_dim, self.dtype, self.device
        )
        e.blocks.pools.append(pool)
        return pool

    def runner(self, model: torch.nn.Module, pool: torch.Tensor) -> ModelRunner:
        """A model runner for a strategy's own model over `pool` (CUDA graphs as the engine's)."""
        runner = ModelRunner(model, pool, self.block_size, self.device)
        if not self.config.enforce_eager:
            runner.capture_graphs(
                self.config.max_num_batched_tokens, -(-self.max_model_len // self.block_size)
            )
        return runner

    def capture_hidden(self, layers: list[int]) -> None:
        """From now on every target forward's `ForwardOutput.aux_hidden` holds the residual stream
        entering these target layers (EAGLE-3's features), side by side."""
        e = self._engine
        e.runner.capture(layers, e.config.max_num_batched_tokens)

    # -- sequences --------------------------------------------------------------------------------
    def spawn(self, parent: Sequence, tokens: list[int], generator: torch.Generator, **fields) -> Sequence:
        """A hidden sequence over `parent`'s blocks (shared, copy-on-write) with `tokens` (the parent's
        and more), running from the next step. It streams nothing; when it must end (a stop token, the
        context) its request ends. `fields` set other Sequence fields (matcher, position_offset, ...)."""
        e = self._engine
        child = Sequence(
            seq_id=e.new_seq_id(),
            request_id=parent.request_id,
            index=parent.index,
            token_ids=tokens,
            num_prompt_tokens=parent.num_prompt_tokens,
            params=parent.params,
            strategy=parent.strategy,
            generator=generator,
            strategy_params=parent.strategy_params,
            parent=parent,
            root=parent.root or parent,
            position_offset=parent.position_offset,
            max_cacheable=parent.max_cacheable,
            **fields,
        )
        e.blocks.fork(parent, child)
        parent.children.append(child)
        e.scheduler.start(child)
        return child

    def pause(self, seq: Sequence) -> None:
        """`seq` stops being scheduled and keeps its blocks (its hidden children run)."""
        self._engine.scheduler.pause(seq)

    def resume(self, seq: Sequence) -> None:
        self._engine.scheduler.resume(seq)

    def release(self, seq: Sequence) -> None:
        """End a hidden sequence quietly (its tokens are its parent's to use): its blocks come back."""
        self._engine.scheduler.release(seq)

    def adopt_kv(self, seq: Sequence, sources: list[tuple[Sequence, int, int]], at: int) -> None:
        """`seq` takes the K/V of `sources` (sequence, start, end: its slots start..end-1), in order, as its
        own slots from `at` on, and runs again. The source sequences end (released) first, so their
        blocks are there to take; if the cache still has no room, `seq` waits swapped out with that K/V,
        as a preempted sequence does: this never fails for want of blocks."""
        self._engine.scheduler.adopt_kv(seq, sources, at)

    def append(self, seq: Sequence, token: int) -> None:
        """Append a token a strategy forced or merged (not sampled): stop checks and grammar as usual."""
        self._engine.append(seq, token)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self._engine.finish(seq, reason, error)
