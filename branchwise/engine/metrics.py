"""Prometheus metrics of one engine, named as vLLM's dashboards know them (with our `branchwise:` prefix)."""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class EngineMetrics:
    """One registry per engine, so several engines (tests, benchmarks) can live in one process."""

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        m = ["model_name"]
        s = ["model_name", "strategy"]
        self.running = Gauge("branchwise:num_requests_running", "Sequences running this step", m, registry=r)
        self.waiting = Gauge("branchwise:num_requests_waiting", "Sequences waiting to run", m, registry=r)
        self.kv_usage = Gauge(
            "branchwise:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full)", m, registry=r
        )
        self.kv_free = Gauge("branchwise:kv_cache_free_blocks", "Free KV blocks", m, registry=r)
        self.kv_total = Gauge("branchwise:kv_cache_total_blocks", "Total KV blocks", m, registry=r)
        self.prompt_tokens = Counter("branchwise:prompt_tokens", "Prompt tokens processed", m, registry=r)
        self.generation_tokens = Counter("branchwise:generation_tokens", "Tokens generated", m, registry=r)
        self.preemptions = Counter("branchwise:num_preemptions", "Sequences preempted", m, registry=r)
        self.request_success = Counter(
            "branchwise:request_success", "Finished requests", m + ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "branchwise:time_to_first_token_seconds",
            "Time to first token",
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = StepHistogram(
            "branchwise:inter_token_latency_seconds",
            "Time between a sequence's token chunks",
            model_name,
            LATENCY_BUCKETS,
        )
        r.register(self.itl)
        self.e2e = Histogram(
            "branchwise:e2e_request_latency_seconds",
            "Request latency end to end",
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.spec_drafts = Counter("branchwise:spec_decode_num_drafts", "Draft steps", s, registry=r)
        self.spec_draft_tokens = Counter(
            "branchwise:spec_decode_num_draft_tokens", "Drafted tokens", s, registry=r
        )
        self.spec_accepted = Counter(
            "branchwise:spec_decode_num_accepted_tokens", "Accepted drafted tokens", s, registry=r
        )
        self.spec_accepted_per_pos = Counter(
            "branchwise:spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens by draft position",
            s + ["position"],
            registry=r,
        )
        # token trees (Medusa): a node is the rank-th candidate of the head at its depth
        self.tree_proposed = Counter(
            "branchwise:spec_decode_tree_proposed_tokens",
            "Tree nodes proposed, by depth and candidate rank",
            s + ["depth", "rank"],
            registry=r,
        )
        self.tree_accepted = Counter(
            "branchwise:spec_decode_tree_accepted_tokens",
            "Tree nodes accepted, by depth and candidate rank",
            s + ["depth", "rank"],
            registry=r,
        )
        self.constrained = Counter(
            "branchwise:structured_output_requests", "Requests with a grammar constraint", m, registry=r
        )
        self.forced_tokens = Counter(
            "branchwise:structured_output_forced_tokens", "Tokens appended by jump-forward", m, registry=r
        )
        self.mask_time = Histogram(
            "branchwise:structured_output_mask_seconds",
            "Time to compute a step's grammar masks",
            m,
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
            registry=r,
        )
        self.multiverse_paths = Counter(
            "branchwise:multiverse_paths", "Parallel paths forked by the multiverse strategy", m, registry=r
        )
        self.multiverse_parallelism = Histogram(
            "branchwise:multiverse_parallelism",
            "Output tokens per engine step of a finished multiverse request (1 = sequential)",
            m,
            buckets=(1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0),
            registry=r,
        )
        self.prefix_queries = Counter(
            "branchwise:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", m, registry=r
        )
        self.prefix_hits = Counter(
            "branchwise:prefix_cache_hits", "Prompt tokens found in the prefix cache", m, registry=r
        )
        self.model_name = model_name


class StepHistogram:
    """A histogram of one model's values observed a step at a time (`observe_many`), exported through
    prometheus_client's collector interface as a `Histogram` would be. Values wait in a list and are counted
    into buckets by one numpy call per few thousand (or at a scrape): a locked `Histogram.observe` per
    sequence per step took about 2 us each, a tenth of a batch-32 step's host work."""

    FLUSH_AT = 4096  # pending values counted at once

    def __init__(self, name: str, documentation: str, model_name: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.model_name = name, documentation, model_name
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.pending: list[float] = []
        self.lock = threading.Lock()  # a scrape runs on the server's thread

    def observe_many(self, values: list[float]) -> None:
        with self.lock:
            self.pending += values
            if len(self.pending) >= self.FLUSH_AT:
                self._flush()

    def _flush(self) -> None:
        """Count the pending values (the lock held)."""
        if not self.pending:
            return
        # value <= bound counts in that bound's bucket (Prometheus' `le`)
        self.counts += np.bincount(
            np.searchsorted(self.bounds, self.pending, side="left"), minlength=len(self.counts)
        )
        self.sum = sum(self.pending, self.sum)
        self.pending = []

    def collect(self) -> list[HistogramMetricFamily]:
        with self.lock:
            self._flush()
            cumulative, total = np.cumsum(self.counts).tolist(), self.sum
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model_name"])
        les = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        family.add_metric([self.model_name], list(zip(les, cumulative, strict=True)), total)
        return [family]
