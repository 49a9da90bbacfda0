"""Suffix decoding (Oliaro et al. 2024, arXiv 2411.04975): model-free tree drafts from what followed earlier
occurrences of the sequence's last tokens, in its own prompt and output and in recent requests' outputs.

For a match length m, the occurrences of the context's last m tokens and what followed each form a tree: a
node's probability is its parent's times the share of the parent's occurrences that continue with it. The
tree keeps its most probable nodes above `min_token_prob`, at most `max_spec_factor * m` of them and
`max_tree_depth - m` deep (longer matches are rarer and surer). Of every m and both corpora the tree with
the highest sum of node probabilities (its expected accepted length) is drafted; a longer match wins ties.
Greedy requests verify the whole tree (the longest path the target agrees with); sampled ones verify its
most likely chain by the chain rule with a point-mass draft, so both are exact. Speculation adapts twice:
to the match length, and through the cost rule of `speculative.py`, which raises the probability floor
when feeding a node costs more than it is likely to return. Counts are overconfident (a continuation seen
once has probability 1; on the demo's chat about 40 % of the length they predict is accepted), so the rule
weighs a node d deep by alpha^d, alpha the sequence's per-token acceptance as the chain drafters estimate
it (its accepted runs, fading towards the strategy's); best-first order and scores follow the weighted
probabilities. A sequence whose alpha is below the cost is not searched at all (the search costs host time
whatever it finds) until its evidence fades. A fixed `num_speculative_tokens` keeps the counts as they are.

The global cache holds the outputs of the last `suffix_max_cached_requests` finished requests, at most
`suffix_max_cached_tokens` tokens in all, the oldest leaving first; it is searched through an index of
each token's positions, updated as requests finish.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.sequence import Sequence
from branchwise.engine.stats import StepStats
from branchwise.strategies.base import Resources, Strategy, verify_chains
from branchwise.strategies.speculative import Acceptance, AdaptiveK
from branchwise.strategies.tree import plain_greedy, prune, tree_of, tree_plan, verify_greedy, verify_longest

if TYPE_CHECKING:
    from branchwise.engine.context import StrategyContext

DEFAULTS = {"num_speculative_tokens": 24, "max_tree_depth": 24, "max_spec_factor": 1.0, "min_token_prob": 0.1}
MAX_NODES = 64  # the largest tree a request may ask for
RECENT = 4096  # occurrences of the last token searched: the most recent (bounds a step's work)
COUNTED = 256  # occurrences through a node whose continuations are counted: the most recent


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)  # node i + 1 of the tree
    parents: list[int] = field(default_factory=list)  # tree index of each node's parent (0: the root)
    score: float = 0.0  # sum of the nodes' (weighted) probabilities
    match_len: int = 0


class Prompt:
    """A sequence's own tokens as a corpus (its last token, the context's end, is no earlier occurrence)."""

    def __init__(self) -> None:
        self.buffer = np.empty(256, dtype=np.int32)  # grows by doubling: appending is amortised O(1)
        self.length = 0

    @property
    def tokens(self) -> np.ndarray:
        return self.buffer[: self.length]

    def update(self, token_ids: list[int]) -> None:
        new = token_ids[self.length :]
        if not new:
            return
        if self.length + len(new) > len(self.buffer):
            grown = np.empty(max(2 * len(self.buffer), self.length + len(new)), dtype=np.int32)
            grown[: self.length] = self.tokens
            self.buffer = grown
        self.buffer[self.length : self.length + len(new)] = new
        self.length += len(new)

    def occurrences(self, token: int) -> np.ndarray:
        return np.flatnonzero(self.tokens[:-1] == token)

    def at(self, pos: np.ndarray) -> np.ndarray:
        ok = (pos >= 0) & (pos < self.length)
        return np.where(ok, self.buffer[np.where(ok, pos, 0)], -1)


class SuffixCache:
    """Recent outputs in a ring of at most `max_tokens` slots (each output followed by a -1) addressed by
    absolute position, and for every token the positions it sits at (those before `head` are gone)."""

    def __init__(self, max_requests: int, max_tokens: int) -> None:
        self.max_requests, self.capacity = max_requests, max_tokens
        self.ring = np.full(min(max_tokens, 4096), -1, dtype=np.int32)  # grows up to the capacity
        self.head = self.tail = 0  # absolute positions: the oldest kept slot, the next free one
        self.outputs: deque[tuple[int, int]] = deque()  # (start, end) of each cached output, oldest first
        self.positions: dict[int, array] = {}  # token -> absolute positions, ascending
        self.first: dict[int, int] = {}  # token -> index of its first position not yet evicted
        self.stored = 0  # positions in all the lists, evicted ones included (at most twice the kept)

    @property
    def num_tokens(self) -> int:
        return self.tail - self.head

    def add(self, tokens: list[int]) -> None:
        tokens = tokens[: self.capacity - 1]
        if not tokens or self.max_requests == 0:
            return
        while self.outputs and (
            len(self.outputs) >= self.max_requests or self.num_tokens + len(tokens) + 1 > self.capacity
        ):
            self.outputs.popleft()
            self.head = self.outputs[0][0] if self.outputs else self.tail
        if self.num_tokens + len(tokens) + 1 > len(self.ring):
            self._resize(min(self.capacity, 2 * (self.num_tokens + len(tokens) + 1)))
        start = self.tail
        self.ring[(start + np.arange(len(tokens) + 1)) % len(self.ring)] = tokens + [-1]
        for i, t in enumerate(tokens, start):
            self.positions.setdefault(t, array("q")).append(i)
        self.tail = start + len(tokens) + 1
        self.outputs.append((start, self.tail))
        self.stored += len(tokens)
        if self.stored > 2 * max(self.num_tokens, 1024):
            self._compact()

    def occurrences(self, token: int) -> np.ndarray:
        found = self.positions.get(token)
        if found is None:
            return np.empty(0, dtype=np.int64)
        pos = np.frombuffer(found, dtype=np.int64)
        first = self.first.get(token, 0)
        if first < len(pos) and pos[first] < self.head:
            first = self.first[token] = int(np.searchsorted(pos, self.head))
        return pos[first:]

    def at(self, pos: np.ndarray) -> np.ndarray:
        ok = (pos >= self.head) & (pos < self.tail)
        return np.where(ok, self.ring[np.where(ok, pos, 0) % len(self.ring)], -1)

    def _resize(self, size: int) -> None:
        kept = np.arange(self.head, self.tail)
        ring = np.full(size, -1, dtype=np.int32)
        ring[kept % size] = self.ring[kept % len(self.ring)]
        self.ring = ring

    def _compact(self) -> None:
        """Drop the evicted positions of every list (and the lists left empty)."""
        self.first.clear()
        for token, found in list(self.positions.items()):
            pos = np.frombuffer(found, dtype=np.int64)
            kept = pos[np.searchsorted(pos, self.head) :]
            if kept.size:
                self.positions[token] = array("q", kept.tobytes())
            else:
                del self.positions[token]
        self.stored = self.num_tokens - len(self.outputs)


def matches(corpus, context: np.ndarray, max_len: int) -> list[np.ndarray]:
    """ends[m - 1]: the positions where an occurrence of the context's last m tokens ends, for m = 1, ...
    while there are any (a shorter suffix occurs wherever a longer one does)."""
    ends = corpus.occurrences(int(context[-1]))[-RECENT:]
    found = []
    for m in range(1, min(max_len, len(context)) + 1):
        if m > 1:
            ends = ends[corpus.at(ends - (m - 1)) == context[-m]]
        if not ends.size:
            break
        found.append(ends)
    return found


def grow(
    corpus,
    ends: np.ndarray,
    max_nodes: int,
    max_depth: int,
    min_prob: float,
    tree: bool,
    alpha: float = 1.0,
    cost_floor: float = 0.0,
) -> Draft:
    """The most probable continuation nodes of the occurrences ending at `ends`, best first by probability
    times alpha^depth (a chain: the most frequent continuation at every depth); a node's probability is at
    least `min_prob`, its weighted one at least `cost_floor`."""
    draft, heap, order = Draft(), [], itertools.count()

    def expand(pos: np.ndarray, prob: float, node: int, depth: int) -> None:
        if depth >= max_depth:
            return
        after = pos[-COUNTED:] + 1  # continuation shares estimated from the most recent occurrences
        # grouped in a dict: np.unique costs ~60 us whatever the size, this ~4 us at the usual few
        groups: dict[int, list[int]] = {}
        for token, at in zip(corpus.at(after).tolist(), after.tolist(), strict=True):
            if token >= 0:
                groups.setdefault(token, []).append(at)
        ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))  # most frequent, then lowest id
        weight = alpha ** (depth + 1)
        for token, at in ranked[:max_nodes] if tree else ranked[:1]:
            p = prob * len(at) / min(len(pos), COUNTED)  # counting the occurrences that end here
            if p < min_prob or p * weight < cost_floor:
                break
            heapq.heappush(heap, (-p * weight, next(order), token, np.array(at), node, depth + 1, p))

    expand(ends, 1.0, 0, 0)
    while heap and len(draft.tokens) < max_nodes:
        neg, _, token, pos, parent, depth, p = heapq.heappop(heap)
        draft.tokens.append(token)
        draft.parents.append(parent)  # popped before its children: every prefix is a tree
        draft.score -= neg
        if len(draft.tokens) < max_nodes:  # else no child could join
            expand(pos, p, len(draft.tokens), depth)
    return draft


def speculate(
    corpora: list,
    context: np.ndarray,
    params: dict,
    min_prob: float,
    tree: bool,
    max_depth: int,
    alpha: float = 1.0,
    cost_floor: float = 0.0,
) -> Draft:
    """The best draft over the corpora and every match length (see the module docstring); no node
    deeper than `max_depth`; `alpha` and `cost_floor` as in `grow`."""
    best = Draft()
    depth = params["max_tree_depth"]
    for corpus in corpora:
        found = matches(corpus, context[-depth:], depth - 1)
        for m in range(len(found), 0, -1):
            limit = min(params["num_speculative_tokens"], int(m * params["max_spec_factor"] + 1e-6))
            if limit <= best.score:  # no shorter match can beat it: a tree scores at most its size
                break
            draft = grow(
                corpus, found[m - 1], limit, min(depth - m, max_depth), min_prob, tree, alpha, cost_floor
            )
            if draft.score > best.score:
                best, best.match_len = draft, m
    return best


@dataclass
class SuffixState(Acceptance):  # the evidence of its drafts' tokens (alpha), as the chain drafters keep it
    prompt: Prompt = field(default_factory=Prompt)
    draft: Draft | None = None
    draft_key: tuple[int, int] = (-1, -1)  # (step, tokens) the draft was made for
    depth: int = 0  # of the deepest node fed this step


class SuffixStrategy(Strategy):
    name = "suffix"

    def __init__(self, ctx: StrategyContext, resources: Resources | None = None) -> None:
        super().__init__(ctx)
        self.k = AdaptiveK(self.name, MAX_NODES)  # its plain steps, cost threshold and penalty
        self.cache = SuffixCache(ctx.config.suffix_max_cached_requests, ctx.config.suffix_max_cached_tokens)
        self.defaults = dict(DEFAULTS)
        if (
            "num_speculative_tokens" in ctx.config.model_fields_set
        ):  # --num-speculative-tokens, or vLLM's config
            self.defaults["num_speculative_tokens"] = ctx.config.num_speculative_tokens

    def parse_params(self, params: dict) -> dict:
        """`num_speculative_tokens` (most tree nodes; fixed, no cost rule), `max_tree_depth`,
        `max_spec_factor`, `min_token_prob`: vLLM's suffix decoding knobs."""
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"strategy 'suffix' takes {', '.join(DEFAULTS)}, got {sorted(unknown)}")
        for key in ("num_speculative_tokens", "max_tree_depth"):
            v = params.get(key)
            low = 0 if key == "num_speculative_tokens" else 2
            if v is not None and not (
                isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_NODES
            ):
                raise ValueError(f"{key} must be an integer in [{low}, {MAX_NODES}]")
        factor, floor = params.get("max_spec_factor"), params.get("min_token_prob")
        if factor is not None and not (isinstance(factor, int | float) and 0 < factor <= 64):
            raise ValueError("max_spec_factor must be a number in (0, 64]")
        if floor is not None and not (isinstance(floor, int | float) and 0 <= floor <= 1):
            raise ValueError("min_token_prob must be a number in [0, 1]")
        return dict(params)

    def begin_step(self, stats: StepStats) -> None:
        self.k.begin_step(stats)

    def _draft(self, seq: Sequence) -> Draft:
        """This step's draft for `seq`, made once (lookahead sizes the budget, propose feeds it)."""
        if seq.strategy_state is None:
            seq.strategy_state = SuffixState()
        st = seq.strategy_state
        key = (self.k.stats.step, seq.num_tokens)
        if st.draft_key != key:
            st.prompt.update(seq.token_ids)
            params = self.defaults | seq.strategy_params
            fixed = "num_speculative_tokens" in seq.strategy_params
            left = (seq.params.max_tokens or self.ctx.max_model_len) - seq.num_output_tokens
            room = min(left - 1, self.ctx.max_model_len - seq.num_tokens - 1)
            alpha, cost_floor = 1.0, 0.0
            if not fixed and not self.k.plain:  # the cost rule: a node must be likelier than its cost
                alpha, cost_floor = self.k.acceptance(st), self.k.threshold()
            params["num_speculative_tokens"] = min(params["num_speculative_tokens"], room)
            # no node can pass (one is at most alpha likely): no search, the step costs what `ar`'s does
            if params["num_speculative_tokens"] <= 0 or cost_floor > alpha or (self.k.plain and not fixed):
                st.draft = Draft()
            else:
                tree = seq.params.greedy  # sampled requests verify one chain exactly
                corpora, floor = [st.prompt, self.cache], params["min_token_prob"]
                st.draft = speculate(corpora, st.prompt.tokens, params, floor, tree, room, alpha, cost_floor)
            st.draft_key = key
        return st.draft

    def lookahead(self, seq: Sequence) -> int:
        return len(self._draft(seq).tokens)

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        plans = []
        for seq, budget in zip(seqs, budgets, strict=True):
            pending = seq.token_ids[seq.num_computed :]
            draft = self._draft(seq) if budget > 1 else Draft()
            drafts, parents = draft.tokens[: budget - 1], draft.parents[: budget - 1]  # a prefix is a tree
            parent = (-1, *parents)
            if drafts and seq.matcher is not None:
                kept = prune(seq, parent, drafts)
                renumber = {0: 0, **{k: j for j, k in enumerate(kept, 1)}}
                drafts = [drafts[k - 1] for k in kept]
                parent = (-1, *(renumber[parent[k]] for k in kept))
            if drafts:
                depth = [0] * len(parent)  # parents come first
                for k in range(1, len(parent)):
                    depth[k] = depth[parent[k]] + 1
                seq.strategy_state.depth = max(depth)
            if any(p != k for k, p in enumerate(parent[1:])):  # it branches
                plans.append(tree_plan(seq, drafts, tree_of(parent), payload=tree_of(parent)))
            else:
                plans.append(Plan(seq, pending + drafts, num_logits=len(drafts) + 1, drafts=drafts))
        self.k.drafting |= any(p.drafts for p in plans)
        return plans

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(plans)
        chains = [i for i, p in enumerate(plans) if p.payload is None]
        fast = [i for i, p in enumerate(plans) if p.payload is not None and plain_greedy(p.seq)]
        other = [i for i, p in enumerate(plans) if p.payload is not None and i not in fast]
        found = (
            (chains, verify_chains(self.ctx, [plans[i] for i in chains], out.of(chains)) if chains else []),
            (fast, verify_greedy(plans, fast, [plans[i].payload for i in fast], out)),
            (other, verify_longest(self.ctx, plans, other, [plans[i].payload for i in other], out)),
        )
        for idx, group in found:
            for i, v in zip(idx, group, strict=True):
                verdicts[i] = v
        for p, v in zip(plans, verdicts, strict=True):
            if p.drafts and v is not None:
                st = p.seq.strategy_state
                self.k.observe(st, st.depth, min(len(v.tokens) - 1, st.depth))
        return verdicts

    def on_finish(self, seq: Sequence) -> None:
        self.cache.add(seq.output_token_ids)

    def on_preempt(self, seq: Sequence) -> None:
        """Nothing refers to K/V: the state (the sequence's own tokens) stays."""

    def reset_cache(self) -> None:
        self.cache = SuffixCache(self.cache.max_requests, self.cache.capacity)
