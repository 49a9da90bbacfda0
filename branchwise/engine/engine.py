"""The engine and its one decode loop body, `step()` (see docs/architecture.md for the data path)."""

from __future__ import annotations

import copy
import itertools
import logging
import queue
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from transformers import AutoConfig

from branchwise.config import EngineConfig
from branchwise.constraints import Constraint, Grammars
from branchwise.engine import detokenizer, tensor_parallel
from branchwise.engine.context import StrategyContext
from branchwise.engine.kv_cache import BlockManager, new_pool, pool_block_bytes
from branchwise.engine.metrics import EngineMetrics
from branchwise.engine.model_runner import ModelRunner
from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.prefix_cache import PrefixCache
from branchwise.engine.sampler import logprobs_of, next_tokens
from branchwise.engine.scheduler import Scheduler, family_of
from branchwise.engine.sequence import (
    FINISHED,
    RUNNING,
    InvalidRequest,
    SamplingParams,
    Sequence,
    SeqUpdate,
    Status,
)
from branchwise.engine.stats import CostModel, StepStats, smoothed
from branchwise.models import demo
from branchwise.models.loader import kv_shape, load_model, load_tokenizer, resolve_device, resolve_dtype
from branchwise.strategies import Resources, Strategy, registry, strategy_class

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """Async scheduling: plans whose sampled tokens are still on the device when the next step launches.
    Until they are read, each such sequence ends with a placeholder token -(1 + i) for tokens[i]."""

    plans: list[Plan]
    tokens: torch.Tensor  # (B,) on the device: what the next forward reads in place of the placeholders
    host: torch.Tensor  # (B,) their copy on the host, complete once `ready` has fired
    ready: torch.cuda.Event | None  # None on CPU: the copy is already done

    def read(self) -> list[int]:
        """The tokens on the host (waits for this step's device work only, not the next step's)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


CPU_KV_CACHE_BYTES = 2 << 30
MAX_FORCED_PENDING = 64  # at most this many pending tokens after the prompt still go to the strategy


class LLMEngine:
    """Owns the model, the paged KV cache, the scheduler and the strategies; `step()` runs one forward."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = demo.resolve(config.model)
        self.model_name = config.served_model_name or config.model
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_path)
        tp = config.tensor_parallel_size
        self.ranks = None  # the other tensor-parallel ranks (engine/tensor_parallel.py)
        if tp > 1:
            model_config = AutoConfig.from_pretrained(self.model_path)
            self.ranks = tensor_parallel.start(model_config, tp, self.model_path, self.dtype, self.device)
        self.model = load_model(self.model_path, self.dtype, self.device, tensor_parallel=tp > 1)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = _eos_ids(self.model, self.tokenizer)

        # what strategies need besides the target (a draft model, an MTP module, heads) loads here, so that
        # their K/V pools count in the memory budget; which strategy asked is theirs to know
        self.resources: dict[str, Resources] = {}
        for name, cls in registry().items():
            found = cls.resources(config, self.model_path, self.model, self.dtype, self.device)
            if found is not None:
                self.resources[name] = found
        bs = config.block_size
        layers, kv_heads, head_dim = kv_shape(self.model)
        kv_heads //= tp  # this rank's share
        block_bytes = pool_block_bytes(layers, bs, kv_heads, head_dim, self.dtype)
        shapes = [r.kv_shape for r in self.resources.values() if r.kv_shape is not None]
        block_bytes += sum(pool_block_bytes(*shape, bs, self.dtype) for shape in shapes)
        self.num_blocks = config.num_blocks or self._auto_num_blocks(block_bytes)
        pool = new_pool(layers, self.num_blocks, bs, kv_heads, head_dim, self.dtype, self.device)
        if self.ranks is None:
            self.blocks = BlockManager(self.num_blocks, bs)
            self.runner = ModelRunner(self.model, pool, bs, self.device)
        else:
            self.ranks.send("init", self.num_blocks, bs)
            self.blocks = tensor_parallel.ShardedBlocks(self.num_blocks, bs, self.ranks)
            self.runner = tensor_parallel.ShardedRunner(self.model, pool, bs, self.device, self.ranks)
        self.blocks.pools.append(pool)

        model_len = config.max_model_len or getattr(self.model.config, "max_position_embeddings", 2048)
        self.max_model_len = min(model_len, self.num_blocks * bs)
        if self.max_model_len < model_len:
            log.warning("max_model_len lowered to %d: the KV cache holds no more", self.max_model_len)
        self.scheduler = Scheduler(config, self.blocks, self.max_model_len)
        self.scheduler.on_preempt = self._on_preempt
        self.prefix_cache = PrefixCache(self.blocks) if config.prefix_cache else None
        self.scheduler.prefix_cache = self.prefix_cache
        self.scheduler.on_cache_hit = self._on_cache_hit
        if not config.enforce_eager:
            self.runner.capture_graphs(config.max_num_batched_tokens, -(-self.max_model_len // bs))

        self.metrics = EngineMetrics(self.model_name)
        self.metrics.kv_total.labels(self.model_name).set(self.num_blocks)
        # the children counted at every token, looked up once (a `labels()` call takes a lock)
        self._generation_tokens = self.metrics.generation_tokens.labels(self.model_name)
        self._itl: list[float] = []  # this step's inter-token latencies, observed at its end
        m = self.metrics
        self._load_gauges = [g.labels(self.model_name) for g in (m.running, m.waiting, m.kv_free, m.kv_usage)]
        self._last_load: tuple[int, int, int] | None = None  # what the gauges show
        self._spec_children: dict[str, tuple] = {}  # strategy -> its speculation counters, looked up once
        self.decode = detokenizer.decoder_for(self.tokenizer)
        self.rust_tokenizer = detokenizer.rust_tokenizer(self.tokenizer)
        self._strategies: dict[str, Strategy] = {}
        self._strategy_lock = threading.Lock()
        self._grammars: Grammars | None = None
        self.step_cost = CostModel()  # target forward + verification time vs tokens fed
        self.stats = StepStats()  # what every strategy is told before a step
        self.context = StrategyContext(self)
        self.strategy(config.strategy)  # fail at start-up, not at the first request
        for name in self.resources:  # their K/V pools and CUDA graphs, before any request
            self.strategy(name)
        self._requests: dict[str, list[Sequence]] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox_lock = threading.Lock()
        self._num_inbox_seqs = 0  # sequences in the inbox
        self._num_waiting_seqs = 0  # sequences the scheduler holds waiting, as of the last step
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._updates: dict[int, tuple[Sequence, SeqUpdate]] = {}  # this step's, by sequence id
        self._num_generated = 0  # tokens appended this step (the counter is told once a step)
        self._in_flight: InFlight | None = None  # async scheduling: the previous step's unread tokens
        self._launched: InFlight | None = None  # this step's, in flight once the step returns
        self.num_deferred = 0  # tokens read back a step after they were sampled (async scheduling)
        self.num_steps = 0
        self._observe_load()  # the KV gauges read right before the first step

    # -- set-up -----------------------------------------------------------------------------------
    def _auto_num_blocks(self, block_bytes: int) -> int:
        c = self.config
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            hidden = self.model.config.hidden_size
            inter = getattr(self.model.config, "intermediate_size", 4 * hidden)
            activations = (
                c.max_num_batched_tokens * (6 * hidden + 3 * inter) * 4 + 64 * self.vocab_size * 4 * 16
            )
            budget = free - (1 - c.gpu_memory_utilization) * total - activations
        else:
            max_len = c.max_model_len or getattr(self.model.config, "max_position_embeddings", 2048)
            budget = min(CPU_KV_CACHE_BYTES, c.max_num_seqs * max_len * block_bytes // c.block_size)
        num = int(budget // block_bytes)
        if num < 1:
            raise RuntimeError(
                "no memory left for the KV cache; lower max_num_batched_tokens or raise "
                "gpu_memory_utilization"
            )
        return num

    def strategy(self, name: str) -> Strategy:
        """The engine's instance of a strategy (created on first use); ValueError if unknown."""
        if (found := self._strategies.get(name)) is not None:  # once per sequence and step: no lock
            return found
        cls = strategy_class(name)
        with self._strategy_lock:
            if cls.name not in self._strategies:
                self._strategies[cls.name] = cls(self.context, self.resources.get(cls.name))
            self._strategies[name] = self._strategies[cls.name]
            return self._strategies[name]

    def grammars(self) -> Grammars:
        """The model's grammar compiler (built on first use: llguidance reads the whole vocabulary)."""
        with self._strategy_lock:
            if self._grammars is None:
                self._grammars = Grammars(
                    self.tokenizer, self.vocab_size, self.eos_token_ids, self.config.max_constraint_seconds
                )
            return self._grammars

    def check_constraint(self, constraint: Constraint) -> list[str]:
        """Compile (cached) a request's constraint: its warnings, or ValueError naming what is wrong."""
        try:
            return self.grammars().compile(constraint)[1]
        except ValueError:
            raise
        except Exception as e:  # e.g. a tokenizer llguidance cannot read
            raise ValueError(f"constraints are not available for this model: {e}") from e

    def stop_token_ids(self, seq: Sequence) -> frozenset[int]:
        """The tokens that end `seq` (made once: every appended token is checked against them)."""
        if seq.stop_ids is None:
            ids = set(seq.params.stop_token_ids)
            seq.stop_ids = frozenset(ids if seq.params.ignore_eos else ids | self.eos_token_ids)
        return seq.stop_ids

    # -- requests (any thread) --------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        strategy: str | None = None,
        strategy_params: dict | None = None,
    ) -> None:
        """Validate and queue a request; raises ValueError with a client-facing message."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.vocab_size
        named = [("prompt", prompt_token_ids), ("stop_token_ids", params.stop_token_ids)]
        for field_name, ids in [*named, ("logit_bias", list(params.logit_bias))]:
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                raise InvalidRequest(f"{field_name}: token ids must be in [0, {vocab})", field_name)
        if params.top_k > vocab:
            raise InvalidRequest(
                f"top_k must be at most the vocabulary size ({vocab}), or 0 or -1 for all", "top_k"
            )
        room = self.max_model_len - n
        if room < 1:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {n} tokens."
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} "
                f"for the completion). Please reduce the length of the prompt or max_tokens."
            )
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n must be at most max_num_seqs ({self.config.max_num_seqs})")
        strat = self.strategy(strategy or self.config.strategy)
        state = strat.parse_params(strategy_params or {})
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.constraint is not None:
            self.check_constraint(params.constraint)
            self.metrics.constrained.labels(self.model_name).inc()
        seqs = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(62)
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=i,
                token_ids=list(prompt_token_ids),
                num_prompt_tokens=n,
                params=params,
                strategy=strat.name,
                generator=torch.Generator().manual_seed(seed),
            )
            seq.strategy_params = state
            if params.constraint is not None:
                seq.matcher = self.grammars().matcher(params.constraint)
            detokenizer.init_offsets(seq, self.rust_tokenizer)
            seqs.append(seq)
        seqs[0].forks = seqs[1:]  # n > 1: one prefill, then the siblings fork off it
        self._requests[request_id] = seqs
        with self._inbox_lock:
            self._num_inbox_seqs += len(seqs)
            self._inbox.put(("add", seqs[0]))

    def abort_request(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (call once no step runs any more)."""
        if self.ranks is not None:
            self.ranks.close()

    def has_unfinished(self) -> bool:
        return bool(self._requests) or not self._inbox.empty()

    @property
    def num_waiting_seqs(self) -> int:
        """Sequences handed in and not running: in the inbox, or waiting as of the last step (any thread)."""
        return self._num_inbox_seqs + self._num_waiting_seqs

    def fail_all(self, error: str) -> list[SeqUpdate]:
        """End every request in flight with an error (after an engine bug) and free their blocks."""
        self._updates = {}
        self._drain_inbox()
        for seqs in list(self._requests.values()):
            for seq in seqs:
                if not seq.finished:
                    self._finish(seq, "error", error)
        self._in_flight = self._launched = None
        return self._step_updates()

    def _drain_inbox(self) -> None:
        while not self._inbox.empty():
            kind, arg = self._inbox.get()
            if kind == "add":
                with self._inbox_lock:
                    self._num_inbox_seqs -= 1 + len(arg.forks)
                self.scheduler.add(arg)
            else:
                for seq in self._requests.get(arg, []):
                    if not seq.finished:
                        self._finish(seq, "abort")

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[SeqUpdate]:
        """One scheduling decision, one target forward, verification and commit; returns what changed."""
        self._updates = {}
        self._drain_inbox()
        started = time.perf_counter()  # drafting's search in `lookahead` counts as the step's cost
        stats = self.stats
        stats.step = self.num_steps + 1
        stats.fixed, stats.per_token = self.step_cost.fit()
        stats.running = Counter(seq.strategy for seq in self.scheduler.running)
        stats.waiting = len(self.scheduler.waiting)
        for strategy in set(self._strategies.values()):
            strategy.begin_step(stats)
        broken: list[tuple[Sequence, Exception]] = []
        # every running sequence's strategy exists (made at admission); a copy: another thread may add one
        drafting = {
            n: s for n, s in dict(self._strategies).items() if type(s).lookahead is not Strategy.lookahead
        }

        def lookahead(seq: Sequence) -> int:
            strategy = drafting.get(seq.strategy)
            if strategy is None:  # drafts nothing (plain decoding)
                return 0
            try:
                return strategy.lookahead(seq) if self._decodes(seq) else 0
            except Exception as e:  # this sequence's strategy failed on it: it alone ends, below
                broken.append((seq, e))
                return 0

        scheduled = self.scheduler.schedule(lookahead)
        for seq, error in broken:
            self._fail([seq], error)
        while self.scheduler.hopeless:
            seq = self.scheduler.hopeless.pop()
            self._finish(seq, "error", "the parallel paths need more KV blocks than the whole cache holds")
        scheduled = [(seq, n) for seq, n in scheduled if seq.status is not FINISHED]
        previous, self._in_flight = self._in_flight, None
        if scheduled:
            self.num_steps += 1
            self._run(scheduled, previous, started)
        else:
            self._resolve(previous)
        self._observe_load()
        updates = self._step_updates()
        if self._launched is not None:
            self._in_flight, self._launched = self._park(self._launched), None
        return updates

    def _run(self, scheduled: list[tuple[Sequence, int]], previous: InFlight | None, started: float) -> None:
        """Propose, one forward, verify and commit; with async scheduling, the previous step's tokens are
        read and committed once this step's forward (which feeds them) is launched. `started`: when the
        step began, scheduling (and the drafts it sized) included."""
        decode: dict[str, list[tuple[Sequence, int]]] = defaultdict(list)
        plans: list[Plan] = []
        for seq, n in scheduled:
            pending = len(seq.token_ids) - seq.num_computed  # (per sequence and step: no property calls)
            if n >= pending and (pending == 1 or self._decodes(seq)):
                decode[seq.strategy].append((seq, n))
            else:
                plans.append(self._prefill_plan(seq, n))
        for name, items in decode.items():
            seqs, budgets = [s for s, _ in items], [n for _, n in items]
            strategy = self.strategy(name)

            def propose(idx: list[int], seqs=seqs, budgets=budgets, strategy=strategy) -> list[Plan]:
                return strategy.propose([seqs[i] for i in idx], [budgets[i] for i in idx])

            proposed = self._isolated(seqs, propose)
            plans += [p for p in proposed if p is not None]
        plans = [p for p in plans if p.seq.status is not FINISHED]
        if not plans:
            self._resolve(previous)
            return
        forward_started = time.perf_counter()
        num_fed = sum([len(p.tokens) for p in plans])
        try:
            out = self.runner.forward(plans, None if previous is None else previous.tokens)
        except Exception as e:
            self._fail([p.seq for p in plans], e)
            self._resolve(previous)
            return
        deferred = self._launch(plans, out) if self.config.async_scheduling else set()
        self._resolve(previous)  # the device is busy with this step meanwhile
        self._attach_prompt_logprobs(plans, out)
        plans, out = self._fork_siblings(plans, out)
        by_strategy: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(plans):
            by_strategy[p.seq.strategy].append(i)
        for name, idx in by_strategy.items():
            strategy = self.strategy(name)
            if type(strategy).on_forward is Strategy.on_forward:  # nothing to do (plain decoding, ...)
                continue
            group, view = [plans[i] for i in idx], out.of(idx)

            def on_forward(sub: list[int], group=group, view=view, strategy=strategy) -> list[None]:
                strategy.on_forward([group[j] for j in sub], view.of(sub))
                return [None] * len(sub)

            self._isolated([p.seq for p in group], on_forward)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(plans):
            if p.seq.status is FINISHED or i in deferred:
                continue
            if p.num_logits > p.prompt_rows:
                groups[p.seq.strategy].append(i)
                continue
            try:  # a prefill chunk short of the prompt's end (or K/V-only tokens)
                p.seq.num_computed += len(p.tokens)
                self._cache(p.seq)
                self.strategy(p.seq.strategy).on_commit(p.seq)
            except Exception as e:
                self._fail([p.seq], e)
        logprob_rows: list[tuple[Sequence, int, int]] = []
        for name, idx in groups.items():
            strategy, group, view = self.strategy(name), [plans[i] for i in idx], out.of(idx)

            def verify(sub: list[int], group=group, view=view, strategy=strategy) -> list[Verdict]:
                return strategy.verify([group[j] for j in sub], view.of(sub))

            verdicts = self._isolated([p.seq for p in group], verify)
            now = time.monotonic()  # the group's tokens reached the host (latency metrics)
            on_commit = None if type(strategy).on_commit is Strategy.on_commit else strategy.on_commit
            for p, v in zip(group, verdicts, strict=True):
                if v is None:
                    continue
                try:
                    self._commit(p, v, logprob_rows, now, on_commit)
                except Exception as e:
                    self._fail([p.seq], e)
        # verification read the logits on the host, so these times include the device's work
        ended = time.perf_counter()
        self.step_cost.observe(num_fed, ended - forward_started)
        tokens = sum([len(u.token_ids) for _, u in self._updates.values()])
        rate = tokens / max(ended - started, 1e-6)
        stats = self.stats
        stats.goodput = smoothed(stats.goodput, rate)
        if sampled := sum(len(idx) for idx in groups.values()) + len(deferred):
            stats.seq_goodput = smoothed(stats.seq_goodput, rate / sampled)
        stats.last_tokens, stats.last_seconds, stats.last_fed = tokens, ended - started, num_fed
        stats.last_prefilled = any(p.num_logits == 0 or len(p.tokens) > 1 + len(p.drafts) for p in plans)
        self._attach_logprobs(out, logprob_rows)

    def _decodes(self, seq: Sequence) -> bool:
        """Its strategy proposes what it feeds: it has one pending token (the sampled one), or its strategy
        drafts past pending tokens and these are a few after its prompt (a grammar's forced continuation)
        or the rest of its prompt (drafted after, verified in the prefill's forward, as transformers'
        assisted generation does: a step saved per request)."""
        if seq.num_pending == 1:
            return True
        if not self.strategy(seq.strategy).drafts_past_pending:
            return False
        if seq.num_computed >= seq.num_prompt_tokens:
            return seq.num_pending <= MAX_FORCED_PENDING
        # siblings fork from the prompt's last row, prompt logprobs score its rows: such a prefill is plain
        return not seq.forks and (seq.params.prompt_logprobs is None or seq.num_output_tokens > 0)

    def _prefill_plan(self, seq: Sequence, n: int) -> Plan:
        """The next n of a sequence's pending tokens: logits only where the prompt ends (or to score it)."""
        last = seq.num_computed + n == seq.num_tokens
        tokens = seq.token_ids[seq.num_computed : seq.num_computed + n]
        if seq.params.prompt_logprobs is None or seq.num_output_tokens:
            return Plan(seq, tokens, int(last))
        # a row scores the next prompt token (those not scored yet); the prompt's last row samples
        first = max(seq.num_computed, len(seq.prompt_logprobs))
        rows = max(0, seq.num_computed + n - int(last) - first)
        return Plan(seq, tokens, rows + int(last), prompt_rows=rows)

    def _isolated(self, seqs: list[Sequence], call: Callable[[list[int]], list]) -> list:
        """`call(indices)` gives one result per index; run over the whole group, as usual. If it raises,
        run it again one index at a time from the same random and strategy state: only sequences whose own
        call raises fail (their result is None), the others get exactly what they would have alone."""
        saved = [
            (
                s.generator.get_state() if s.params.temperature else None,  # greedy draws nothing
                None if s.strategy_state is None else _shallow_copy(s.strategy_state),
            )
            for s in seqs
        ]
        try:
            results = call(list(range(len(seqs))))
            assert len(results) == len(seqs), "a strategy must give one result per sequence"
            return results
        except Exception as e:
            log.warning("a step phase failed for %d sequence(s) (%r): isolating the cause", len(seqs), e)
        results = []
        for i, (seq, (rng, state)) in enumerate(zip(seqs, saved, strict=True)):
            if seq.finished:
                results.append(None)
                continue
            if rng is not None:
                seq.generator.set_state(rng)
            seq.strategy_state = state
            try:
                results += call([i])
            except Exception as e:
                self._fail([seq], e)
                results.append(None)
        return results

    def _fork_siblings(self, plans: list[Plan], out: ForwardOutput) -> tuple[list[Plan], ForwardOutput]:
        """n > 1: when a prompt's prefill completes, its siblings share its blocks and sample on their own
        from the same logits rows."""
        born, rows, token_rows = [], list(out.logits_rows), list(out.token_rows)
        for i, p in enumerate(plans):
            if p.seq.forks and p.num_logits and p.start + len(p.tokens) == p.seq.num_tokens:
                for child in p.seq.forks:
                    self.blocks.fork(p.seq, child)
                    self.scheduler.start(child)
                    born.append(Plan(child, p.tokens, p.num_logits, prompt_rows=p.prompt_rows))
                    rows.append(out.logits_rows[i])
                    token_rows.append(out.token_rows[i])
                p.seq.forks = []
        if not born:
            return plans, out
        return plans + born, replace(out, logits_rows=rows, token_rows=token_rows)

    def _commit(
        self, plan: Plan, verdict: Verdict, logprob_rows: list, now: float, on_commit: Callable | None
    ) -> None:
        """Keep the accepted K/V (compacting a tree path), append the new tokens, check stops; then the
        strategy's `on_commit` (None: the base class's no-op)."""
        seq = plan.seq
        if seq.status is FINISHED:  # ended earlier in this step (a Multiverse path whose request ended)
            return
        keep = verdict.kv_keep
        if keep and keep[-1] != len(keep) - 1:  # increasing offsets: not a prefix of the fed tokens
            src = self.blocks.slots(seq, plan.start, plan.start + len(plan.tokens))
            self.blocks.move_slots(
                torch.tensor([src[k] for k in keep], device=self.device),
                torch.tensor(src[: len(keep)], device=self.device),
            )
        drafted = len(plan.tokens) - (len(seq.token_ids) - plan.start)
        seq.num_computed = plan.start + len(keep)
        if drafted > 0:
            self._count_speculation(seq, drafted, len(verdict.tokens) - 1)
        hidden = seq.parent is not None  # (seq.hidden: this runs per sequence per step)
        if not hidden:  # no latency metrics, no logprobs of its own
            self._observe_latency(seq, now)
        logprobs = seq.params.logprobs is not None and not hidden
        for token, row in zip(verdict.tokens, verdict.logit_rows, strict=True):
            self._append(seq, token)
            if logprobs:
                logprob_rows.append((seq, token, row))
            if seq.status is FINISHED or (seq.matcher is not None and not self._consume(seq, token)):
                break
        if seq.status is not FINISHED:
            self.blocks.truncate(seq, seq.num_computed)
            self._cache(seq)
            if on_commit is not None:
                on_commit(seq)
        # the strategy sees its sampled tokens first (it may pause the sequence); in a hidden sequence,
        # what comes next is the strategy's to decide
        if seq.matcher is not None and seq.status is RUNNING and not hidden:
            self._jump_forward(seq)

    def _observe_latency(self, seq: Sequence, now: float) -> None:
        """Time to first token, or between tokens: `seq`'s new tokens reached the host at `now`."""
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.ttft.labels(self.model_name).observe(now - seq.arrival_time)
            if seq.index == 0:
                self.metrics.prompt_tokens.labels(self.model_name).inc(seq.num_prompt_tokens)
        else:
            self._itl.append(now - seq.last_token_time)
        seq.last_token_time = now

    # -- async scheduling -------------------------------------------------------------------------
    def _defers(self, p: Plan) -> bool:
        """Its token may stay on the device until the next step is launched: plain decoding of one
        unconstrained token (no drafts, logits processing or logprobs) that cannot end it by length."""
        seq, params = p.seq, p.seq.params
        return (
            len(p.tokens) == p.num_logits == 1
            and not p.prompt_rows
            and p.start == seq.num_tokens - 1
            and type(self.strategy(seq.strategy)) is Strategy
            and seq.matcher is None
            and not seq.hidden
            and params.logprobs is None
            and not params.processes_logits
            and seq.num_tokens + 1 < self.max_model_len
            and seq.num_output_tokens + 1 < (params.max_tokens or self.max_model_len)
        )

    def _launch(self, plans: list[Plan], out: ForwardOutput) -> set[int]:
        """Sample the deferrable plans' tokens on the device and start copying them to the host; returns
        their indices (verification skips them). If sampling them fails, they are verified as usual."""
        idx = [i for i, p in enumerate(plans) if self._defers(p)]
        if not idx:
            return set()
        try:
            tokens = next_tokens(out.logits, [plans[i].seq for i in idx], [out.logits_rows[i] for i in idx])
        except Exception:
            log.exception("sampling on the device failed; verifying these %d plan(s) as usual", len(idx))
            return set()
        host, ready = tokens, None
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self._launched = InFlight([plans[i] for i in idx], tokens, host, ready)
        return set(idx)

    def _park(self, flight: InFlight) -> InFlight | None:
        """The launched plans' sequences go on as if their tokens were known: K/V of the fed token counted,
        a placeholder appended (the next forward reads the token on the device). None if all ended."""
        parked = False
        for i, p in enumerate(flight.plans):
            if not p.seq.finished:
                p.seq.num_computed = p.start + 1
                p.seq.token_ids.append(-1 - i)
                parked = True
        return flight if parked else None

    def _resolve(self, flight: InFlight | None) -> None:
        """Read an earlier step's deferred tokens and commit them in place of their placeholders: stop
        checks, detokenizing, the prefix cache (a sequence that ended since keeps nothing)."""
        if flight is None:
            return
        tokens = flight.read()
        now = time.monotonic()
        for p, token in zip(flight.plans, tokens, strict=True):
            seq = p.seq
            if seq.finished:
                continue
            seq.token_ids.pop()
            self.num_deferred += 1
            try:  # as in `_commit`: a failure here ends this sequence only
                self._observe_latency(seq, now)
                self._append(seq, token)
                if not seq.finished:
                    self._cache(seq)
            except Exception as e:
                self._fail([seq], e)

    def _cache(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed full blocks to the prefix cache."""
        full = seq.num_computed // self.blocks.block_size
        if self.prefix_cache is not None and full > seq.num_cached_blocks:
            self.prefix_cache.insert(seq)
            seq.num_cached_blocks = full

    def _on_cache_hit(self, seq: Sequence, num_tokens: int) -> None:
        if seq.num_output_tokens == 0:  # a first admission, not a preempted sequence coming back
            seq.num_cached_prompt = num_tokens
            self.metrics.prefix_queries.labels(self.model_name).inc(seq.num_prompt_tokens)
            self.metrics.prefix_hits.labels(self.model_name).inc(num_tokens)
        seq.num_cached_blocks = num_tokens // self.blocks.block_size

    def _consume(self, seq: Sequence, token: int) -> bool:
        """Commit a token to the sequence's grammar; False (and the sequence ends) when nothing may follow."""
        if not seq.matcher.consume_token(token):
            self._finish(seq, "error", f"grammar rejected a committed token: {seq.matcher.get_error()}")
        elif seq.matcher.is_stopped():  # the grammar is complete (even under ignore_eos)
            self._finish(seq, "stop")
        return not seq.finished

    def _jump_forward(self, seq: Sequence) -> None:
        """Append the grammar's forced continuation: fed, not sampled, in the next forward."""
        forced = seq.matcher.compute_ff_tokens()
        left = (seq.params.max_tokens or self.max_model_len) - seq.num_output_tokens
        forced = forced[: max(0, min(left, self.max_model_len - seq.num_tokens) - 1)]  # room to sample after
        if not forced:
            return
        self.metrics.forced_tokens.labels(self.model_name).inc(len(forced))
        seq.num_forced += len(forced)
        for token in forced:
            self._append(seq, token)
            if seq.finished or not self._consume(seq, token):
                return

    def _count_speculation(self, seq: Sequence, drafted: int, accepted: int) -> None:
        seq.num_draft_steps += 1
        seq.num_drafted += drafted
        seq.num_accepted += accepted
        children = self._spec_children.get(seq.strategy)
        if children is None:
            m, labels = self.metrics, (self.model_name, seq.strategy)
            children = self._spec_children[seq.strategy] = (
                m.spec_drafts.labels(*labels),
                m.spec_draft_tokens.labels(*labels),
                m.spec_accepted.labels(*labels),
                [],  # per accepted position, grown on first use
            )
        drafts, draft_tokens, accepted_tokens, per_pos = children
        drafts.inc()
        draft_tokens.inc(drafted)
        accepted_tokens.inc(accepted)
        while len(per_pos) < accepted:
            per_pos.append(
                self.metrics.spec_accepted_per_pos.labels(self.model_name, seq.strategy, str(len(per_pos)))
            )
        for pos in range(accepted):
            per_pos[pos].inc()

    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    def append(self, seq: Sequence, token: int) -> None:
        """Append a token a strategy forced or merged (not sampled): stop checks, grammar."""
        self._append(seq, token)
        if seq.matcher is not None and not seq.finished:
            self._consume(seq, token)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self._finish(seq, reason, error)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        self._num_generated += 1
        stop_ids = seq.stop_ids if seq.stop_ids is not None else self.stop_token_ids(seq)
        if seq.parent is not None:  # hidden: its text reaches the client through its parent, if at all
            if token in stop_ids or seq.num_tokens >= self.max_model_len:
                self._finish(seq, "stop" if seq.num_tokens < self.max_model_len else "length")
            return
        update = self._update(seq)
        update.token_ids.append(token)
        params = seq.params
        stopped = token in stop_ids
        # a stop token's own text is not output (vLLM's rule), also when special tokens are kept; a text
        # wanted only at the end is decoded once, in `_finish`
        text = (
            ""
            if seq.text_at_end or (stopped and not params.include_stop_str_in_output)
            else detokenizer.detokenize_step(self.decode, seq, self.rust_tokenizer)
        )
        if text:
            seq.output_text += text
        if stopped:
            self._finish(seq, "stop")
        elif params.stop and (at := detokenizer.find_stop(seq, len(text))) is not None:
            seq.output_text = seq.output_text[:at]
            self._finish(seq, "stop")
        elif (n := len(seq.token_ids)) >= self.max_model_len or n - seq.num_prompt_tokens >= (
            params.max_tokens or self.max_model_len
        ):
            self._finish(seq, "length")
        if not seq.text_at_end:
            update.text += detokenizer.sendable_text(seq)

    def _attach_prompt_logprobs(self, plans: list[Plan], out: ForwardOutput) -> None:
        """prompt_logprobs: each prompt row's score of the prompt token after it."""
        for p, row in zip(plans, out.logits_rows, strict=True):
            if not p.prompt_rows:
                continue
            seq = p.seq
            rows = torch.arange(row, row + p.prompt_rows, device=out.logits.device)
            first = p.start + len(p.tokens) - p.num_logits + 1  # the token the first row scores
            targets = seq.token_ids[first : first + p.prompt_rows]
            try:
                entries = logprobs_of(out.logits[rows], targets, [seq.params.prompt_logprobs] * len(targets))
            except Exception as e:
                self._fail([seq], e)
                continue
            seq.prompt_logprobs += entries
            self._update(seq).prompt_logprobs += entries

    def _attach_logprobs(self, out: ForwardOutput, rows: list[tuple[Sequence, int, int]]) -> None:
        if not rows:
            return
        try:
            entries = logprobs_of(
                out.logits[torch.tensor([r for _, _, r in rows], device=out.logits.device)],
                [t for _, t, _ in rows],
                [s.params.logprobs for s, _, _ in rows],
            )
        except Exception as e:  # the tokens stand; the logprobs of this step are lost
            log.exception("logprobs failed for %d row(s)", len(rows), exc_info=e)
            return
        for (seq, _, _), entry in zip(rows, entries, strict=True):
            seq.logprobs.append(entry)
            self._update(seq).logprobs.append(entry)

    # -- endings ----------------------------------------------------------------------------------
    def _update(self, seq: Sequence) -> SeqUpdate:
        """This step's update of `seq` (its counts are filled in once, when the step returns)."""
        entry = self._updates.get(seq.seq_id)
        if entry is None:
            # positional (request_id, index, token_ids, text, logprobs, finish_reason, num_prompt_tokens,
            # num_output_tokens): made for every sequence at every step, and keywords cost twice as much
            update = SeqUpdate(seq.request_id, seq.index, [], "", [], None, seq.num_prompt_tokens, 0)
            entry = self._updates[seq.seq_id] = (seq, update)
        return entry[1]

    def _step_updates(self) -> list[SeqUpdate]:
        """This step's updates with each sequence's counts as they stand at its end."""
        if self._num_generated:
            self._generation_tokens.inc(self._num_generated)
            self._num_generated = 0
        if self._itl:
            self.metrics.itl.observe_many(self._itl)
            self._itl = []
        out = []
        for seq, u in self._updates.values():
            u.num_output_tokens, u.num_cached_prompt, u.num_forced = (
                len(seq.token_ids) - seq.num_prompt_tokens,  # num_output_tokens, without a property call
                seq.num_cached_prompt,
                seq.num_forced,
            )
            u.num_drafted, u.num_accepted, u.num_draft_steps = (
                seq.num_drafted,
                seq.num_accepted,
                seq.num_draft_steps,
            )
            out.append(u)
        return out

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.hidden:  # a hidden sequence cannot end its request alone: the request ends with it
            self._finish(seq.top, reason, error)
            return
        if seq.token_ids and seq.token_ids[-1] < 0:  # ended before its deferred token was read: dropped
            seq.token_ids.pop()
        try:
            self.strategy(seq.strategy).on_finish(seq)
        except Exception:  # the sequence ends all the same, its blocks come back below
            log.exception("strategy %r failed to release sequence %d", seq.strategy, seq.seq_id)
        for hidden in family_of(seq)[1:]:  # what it spawned ends with it
            self.scheduler.release(hidden)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        if self.prefix_cache is not None and seq.block_table:
            self.prefix_cache.insert(seq)
        self.blocks.free(seq)
        seq.strategy_state = seq.swapped = None
        update = self._update(seq)
        update.finish_reason, update.error = reason, error
        if seq.text_at_end:  # a stop token's own text is not output, as in `_append`
            end, params = seq.num_tokens, seq.params
            if seq.num_output_tokens and reason == "stop" and not params.include_stop_str_in_output:
                end -= seq.token_ids[-1] in self.stop_token_ids(seq)  # the stop token, if one ended it
            seq.output_text = detokenizer.whole_text(self.decode, seq, end)
        update.text += detokenizer.sendable_text(seq)
        for sibling in seq.forks:  # aborted before its prefill ended: the siblings end with it
            self._finish(sibling, reason, error)
        seq.forks = []
        siblings = self._requests.get(seq.request_id, [])
        if all(s.finished for s in siblings):
            self._requests.pop(seq.request_id, None)
            self.metrics.e2e.labels(self.model_name).observe(time.monotonic() - seq.arrival_time)
            self.metrics.request_success.labels(self.model_name, reason).inc()

    def _fail(self, seqs: list[Sequence], error: Exception) -> None:
        log.exception("step failed for %d sequence(s)", len(seqs), exc_info=error)
        for seq in seqs:
            if not seq.finished:
                self._finish(seq, "error", f"{type(error).__name__}: {error}")

    def _on_preempt(self, seq: Sequence) -> None:
        self.strategy(seq.strategy).on_preempt(seq)
        self.metrics.preemptions.labels(self.model_name).inc()

    def _observe_load(self) -> None:
        waiting = self.scheduler.waiting
        self._num_waiting_seqs = sum(1 + len(s.forks) for s in waiting) if waiting else 0
        load = (len(self.scheduler.running), len(waiting), self.blocks.num_available)
        if load == self._last_load:  # most decode steps: the gauges are set only when a value moves
            return
        self._last_load = load
        for gauge, value in zip(self._load_gauges, (*load, 1 - load[2] / self.num_blocks), strict=True):
            gauge.set(value)


def _shallow_copy(state):
    """copy.copy(state), four times faster for a plain object (it runs per sequence per step phase)."""
    if state is None:
        return None
    cls = type(state)
    plain = (
        hasattr(state, "__dict__")
        and not hasattr(cls, "__slots__")
        and not hasattr(cls, "__copy__")
        and not hasattr(cls, "__setstate__")
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is object.__getstate__
    )
    if not plain:
        return copy.copy(state)
    new = object.__new__(cls)
    new.__dict__.update(state.__dict__)
    return new


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
