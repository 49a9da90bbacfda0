"""Medusa (Cai et al. 2024): heads on the target's last hidden state guess the next tokens, and a tree of
their top-k candidates is verified in the engine's one target forward under a tree mask.

Head k reads the final-normed hidden state that produced the pending token and guesses the token k + 1
after it. A tree is a list of Medusa "choices": (r1, ..., rd) is the node that takes head 1's r1-th
candidate, then head 2's r2-th, ...; it sits at position start + d and sees the prefix, the pending token
and its ancestors only. The longest path whose tokens the target itself would have chosen is accepted,
its K/V is compacted into the sequence's slots (`Verdict.kv_keep`) and the rest is rolled back; the hidden
state of the last accepted row feeds the heads at the next step (no extra forward). When a grammar forced
f tokens after the pending one, the tree goes after them (fed as its trunk) and head f + d guesses its
depth d: the heads the forced run left still draft, where a plain step would have fed the run alone.

Greedy requests are lossless. Sampled requests use the authors' typical acceptance (a node is accepted when
the target gives it more than min(posterior_threshold, posterior_alpha * exp(-entropy)) probability): fast
but lossy, the output no longer follows the target distribution exactly.

The tree adapts: every (depth, rank) keeps an estimate of how often such a node is accepted when its parent
is; the step's tree holds, best first, the nodes whose path probability beats the cost of feeding one more
token (the rule `speculative.py` uses for chains). A request may pin its own tree with `choices`.
"""

from __future__ import annotations

import functools
import heapq
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from branchwise.engine import sampler
from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.sequence import Sequence
from branchwise.engine.stats import StepStats
from branchwise.models.medusa import find_heads, load_heads, stack_heads
from branchwise.strategies.base import Resources, Strategy, verify_chains
from branchwise.strategies.speculative import AdaptiveK
from branchwise.strategies.tree import (
    Tree,
    longest_path,
    nodes,
    path_verdict,
    plain_greedy,
    prune,
    tree_of,
    tree_plan,
    tree_rows,
    verify_greedy,
    verify_longest,
    verify_paths,
)

if TYPE_CHECKING:
    from branchwise.engine.context import StrategyContext

MAX_NODES = 64  # the largest tree (nodes besides the root)
TOP_K = 8  # candidates a head offers per position
PRIOR_WEIGHT = 4.0  # pseudo-observations behind each (depth, rank) acceptance prior
DECAY = 0.995  # per step, old acceptance evidence fades
POSTERIOR_THRESHOLD, POSTERIOR_ALPHA = 0.09, 0.3  # the authors' typical-acceptance defaults


@functools.lru_cache(maxsize=512)
def build_tree(choices: tuple[tuple[int, ...], ...]) -> Tree:
    """The tree of a sorted, prefix-closed choice list (node i of `choices` is tree index i + 1)."""
    index = {c: i + 1 for i, c in enumerate(choices)}
    return tree_of((-1, *(index[c[:-1]] if len(c) > 1 else 0 for c in choices)))


def check_choices(choices, num_heads: int) -> tuple[tuple[int, ...], ...]:
    """A request's choice list, validated: sorted so that parents come first."""
    if not isinstance(choices, list) or not 0 < len(choices) <= MAX_NODES:
        raise ValueError(f"choices must be a list of 1 to {MAX_NODES} nodes")
    nodes = set()
    for c in choices:
        if not (isinstance(c, list) and c and all(isinstance(r, int) and 0 <= r < TOP_K for r in c)):
            raise ValueError(f"each choice must be a non-empty list of ranks in [0, {TOP_K}), got {c!r}")
        if len(c) > num_heads:
            raise ValueError(f"choice {c} is deeper than the {num_heads} Medusa heads")
        nodes.add(tuple(c))
    for c in nodes:
        if len(c) > 1 and c[:-1] not in nodes:
            raise ValueError(f"choice {list(c)} has no parent {list(c[:-1])} in the list")
    return tuple(sorted(nodes, key=lambda c: (len(c), c)))


@dataclass
class MedusaState:
    hidden: torch.Tensor | None = None  # the hidden state that scored the pending token: the heads' input
    at: int = -1  # the index of the token it scored (the sequence's first pending one while it drafts)


class MedusaStrategy(Strategy):
    name = "medusa"
    drafts_past_pending = True  # after a forced run, the heads it did not cover guess on (no plain step)

    @classmethod
    def resources(cls, config, model_path, model, dtype, device) -> Resources | None:
        found = find_heads(model_path, config.medusa_heads)
        if found is None:
            return None
        # stacked here, before the KV pool is sized: for a moment each layer is held twice
        heads = load_heads(found, model)
        return Resources((heads, stack_heads(heads)), None, found)

    def __init__(self, ctx: StrategyContext, resources: Resources | None = None) -> None:
        super().__init__(ctx)
        if resources is None:
            raise ValueError(
                "strategy 'medusa' needs Medusa heads: --medusa-heads FOLDER (the authors' layout) or a "
                "medusa/ folder beside the model (`branchwise train medusa`)"
            )
        self.k = AdaptiveK(self.name, ctx.config.num_speculative_tokens)  # its plain steps and penalty
        module, self.heads = resources.weights  # the heads and their stacked forward
        self.num_heads = module.num_heads
        # (depth, rank) -> [accepted, reached]: reached = the node's parent was accepted
        self.evidence = {
            (d, r): [PRIOR_WEIGHT * 0.6 * 0.4**r, PRIOR_WEIGHT]  # prior: a lower rank is right more often
            for d in range(1, self.num_heads + 1)
            for r in range(TOP_K)
        }
        # this step's tree per forced-run length (the heads it covered), best first
        self.nodes: dict[int, list[tuple[int, ...]]] = {}

    def parse_params(self, params: dict) -> dict:
        """`choices`: a fixed tree; `posterior_threshold`, `posterior_alpha`: typical acceptance."""
        unknown = set(params) - {"choices", "posterior_threshold", "posterior_alpha"}
        if unknown:
            raise ValueError(
                "strategy 'medusa' takes choices, posterior_threshold and posterior_alpha, got "
                f"{sorted(unknown)}"
            )
        out = dict(params)
        if "choices" in params:
            out["choices"] = check_choices(params["choices"], self.num_heads)
        for key in ("posterior_threshold", "posterior_alpha"):
            v = params.get(key)
            if v is not None and not (isinstance(v, int | float) and 0 < v <= 1):
                raise ValueError(f"{key} must be a number in (0, 1]")
        return out

    # -- the tree ---------------------------------------------------------------------------------
    def _rate(self, depth: int, rank: int) -> float:
        accepted, reached = self.evidence[(depth, rank)]
        return accepted / reached

    def _best_nodes(self, threshold: float, shift: int = 0) -> list[tuple[int, ...]]:
        """Nodes in order of estimated path probability while it beats `threshold`, depth d guessed by
        head shift + d; every prefix of the list is a tree (a node enters the queue only once its parent
        and its next-better sibling left it)."""
        if shift >= self.num_heads:
            return []
        heap = [(-self._rate(shift + 1, 0), (0,))]
        out: list[tuple[int, ...]] = []
        while heap and len(out) < MAX_NODES:
            neg, c = heapq.heappop(heap)
            if -neg <= threshold:
                break
            out.append(c)
            h, r = shift + len(c), c[-1]
            if r + 1 < TOP_K:
                sibling = -neg / max(self._rate(h, r), 1e-9) * self._rate(h, r + 1)
                heapq.heappush(heap, (-sibling, c[:-1] + (r + 1,)))
            if h < self.num_heads:
                heapq.heappush(heap, (neg * self._rate(h + 1, 0), c + (0,)))
        return out

    def state(self, seq: Sequence) -> MedusaState:
        if seq.strategy_state is None:
            seq.strategy_state = MedusaState()
        return seq.strategy_state

    def begin_step(self, stats: StepStats) -> None:
        self.k.begin_step(stats)
        self.nodes = {}  # this step's trees, built at their first lookahead

    def lookahead(self, seq: Sequence) -> int:
        st = seq.strategy_state
        # the heads need the hidden state of its first pending token: none yet after a prompt or a
        # preemption, a stale one while a forced run is fed in chunks (the chunk's forward has no logits)
        if st is None or st.hidden is None or st.at != seq.num_computed:
            return 0
        room = min(MAX_NODES, self.ctx.max_model_len - seq.num_tokens - 1)
        if "choices" not in seq.strategy_params and (self.k.plain or room <= 0):
            return 0
        return max(0, min(len(self._nodes(seq)), room))

    def _nodes(self, seq: Sequence) -> list[tuple[int, ...]]:
        """This step's tree for `seq`, best first (a prefix of the list is a tree): its pinned choices or
        the adaptive tree, for the heads its forced run left (head f + d guesses depth d)."""
        shift = seq.num_pending - 1
        fixed = seq.strategy_params.get("choices")
        if fixed is not None:
            return [c for c in fixed if shift + len(c) <= self.num_heads]
        if shift not in self.nodes:  # once per step and shift: a cache of this step's trees
            self.nodes[shift] = self._best_nodes(self.k.threshold(), shift)
        return self.nodes[shift]

    def _choices(self, seq: Sequence, budget: int) -> tuple[tuple[int, ...], ...]:
        """This step's tree for `seq`, cut to its budget and to the tokens it may still emit."""
        left = (seq.params.max_tokens or self.ctx.max_model_len) - seq.num_output_tokens
        return tuple(sorted(c for c in self._nodes(seq)[:budget] if len(c) < left))

    # -- propose ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        states = [self.state(s) for s in seqs]
        trees = [
            self._choices(s, b - s.num_pending) if b > s.num_pending and st.at == s.num_computed else ()
            for s, b, st in zip(seqs, budgets, states, strict=True)
        ]
        drafting = [i for i, t in enumerate(trees) if t]
        top: list = []
        if drafting:
            hidden = torch.stack([states[i].hidden for i in drafting])
            top = self.heads(hidden).topk(TOP_K, dim=-1).indices.tolist()  # (heads, B, TOP_K)
        row = {i: j for j, i in enumerate(drafting)}
        plans = []
        for i, seq in enumerate(seqs):
            pending = seq.token_ids[seq.num_computed :]
            if not trees[i]:
                plans.append(Plan(seq, pending))
                continue
            j, choices, shift = row[i], trees[i], seq.num_pending - 1  # heads the forced run covered
            drafts = [top[shift + len(c) - 1][j][c[-1]] for c in choices]
            if seq.matcher is not None:
                kept = prune(seq, build_tree(choices).parent, drafts)
                choices, drafts = tuple(choices[k - 1] for k in kept), [drafts[k - 1] for k in kept]
            if not choices:
                plans.append(Plan(seq, pending))
                continue
            plans.append(tree_plan(seq, drafts, build_tree(choices), payload=choices))
        self.k.drafting |= any(p.drafts for p in plans)
        return plans

    # -- verify -----------------------------------------------------------------------------------
    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(plans)
        plain = [i for i, p in enumerate(plans) if p.payload is None]
        if plain:  # prefill ends, steps without a tree
            for i, v in zip(
                plain, verify_chains(self.ctx, [plans[i] for i in plain], out.of(plain)), strict=True
            ):
                verdicts[i] = v
        trees = [i for i, p in enumerate(plans) if p.payload is not None]
        fast = [i for i in trees if plain_greedy(plans[i].seq)]
        greedy = [i for i in trees if i not in fast and plans[i].seq.params.greedy]
        sampled = [i for i in trees if not plans[i].seq.params.greedy]
        for group, verify in ((fast, verify_greedy), (greedy, functools.partial(verify_longest, self.ctx))):
            found = verify(plans, group, [build_tree(plans[i].payload) for i in group], out)
            for i, v in zip(group, found, strict=True):
                verdicts[i] = v
        for i, v in zip(sampled, self._verify_typical(plans, sampled, out), strict=True):
            verdicts[i] = v
        self._keep_hidden(plans, verdicts, out)
        self._learn(plans, verdicts)
        return verdicts

    def _verify_typical(self, plans: list[Plan], idx: list[int], out: ForwardOutput) -> list[Verdict]:
        """Sampled sequences: the longest path typical acceptance takes, run through the sampler's rule."""
        if not idx:
            return []
        accept = self._typical(plans, idx, out)
        picked = [(i, longest_path(build_tree(plans[i].payload).paths, accept[i])) for i in idx]
        num_acc, nxt = verify_paths(self.ctx, plans, picked, out, typical=True)
        return [
            path_verdict(plans[i], out.logits_rows[i], path[:a], t)
            for (i, path), a, t in zip(picked, num_acc, nxt, strict=True)
        ]

    def _typical(self, plans: list[Plan], idx: list[int], out: ForwardOutput) -> dict[int, list[bool]]:
        """Typical acceptance of every node of sampled sequences: p(node | parent) above
        min(threshold, alpha * exp(-entropy of the parent's distribution))."""
        if not idx:
            return {}
        rows = tree_rows(plans, idx, out)
        temps = torch.tensor(
            [max(plans[i].seq.params.temperature, 1e-5) for i in idx for _ in range(plans[i].num_logits)],
            device=out.logits.device,
        )
        x = out.logits[torch.from_numpy(rows).to(out.logits.device)].float()
        seqs = [plans[i].seq for i in idx]
        if any(s.params.logit_bias for s in seqs):  # each node judged under its sequence's bias
            per_row = torch.tensor(
                [j for j, i in enumerate(idx) for _ in range(plans[i].num_logits)], device=x.device
            )
            x = x + sampler.logit_bias(seqs, x.shape[-1], x.device)[per_row]
        logp = torch.log_softmax(x / temps[:, None], -1)
        entropy = -(logp.exp() * logp).sum(-1)
        parents, tokens, limits, at = [], [], [], 0
        for i in idx:
            p, params = plans[i], plans[i].seq.strategy_params
            threshold = params.get("posterior_threshold", POSTERIOR_THRESHOLD)
            alpha = params.get("posterior_alpha", POSTERIOR_ALPHA)
            parents += [at + max(r, 0) for r in build_tree(p.payload).parent]
            tokens += nodes(p)
            limits += [(threshold, alpha)] * p.num_logits
            at += p.num_logits
        parents_t = torch.tensor(parents, device=logp.device)
        prob = logp[parents_t, torch.tensor(tokens, device=logp.device)].exp()
        limit = torch.minimum(
            torch.tensor([t for t, _ in limits], device=logp.device),
            torch.tensor([a for _, a in limits], device=logp.device) * torch.exp(-entropy[parents_t]),
        )
        ok = (prob > limit).tolist()
        result, at = {}, 0
        for i in idx:
            result[i] = ok[at : at + plans[i].num_logits]
            at += plans[i].num_logits
        return result

    # -- after verification -----------------------------------------------------------------------
    def _keep_hidden(self, plans: list[Plan], verdicts: list[Verdict], out: ForwardOutput) -> None:
        """The hidden state that scored each sequence's new pending token feeds the heads next step."""
        rows = [v.logit_rows[-1] for v in verdicts]
        if not rows:
            return
        hidden = out.hidden[torch.tensor(rows, device=out.hidden.device)].clone()
        for p, v, h in zip(plans, verdicts, hidden, strict=True):
            st = self.state(p.seq)
            st.hidden, st.at = h, p.start + len(v.kv_keep)  # the new token sits right after the kept K/V

    def _learn(self, plans: list[Plan], verdicts: list[Verdict]) -> None:
        """Update the (depth, rank) acceptance estimates and the tree-position metrics."""
        proposed, accepted = Counter(), Counter()
        for ev in self.evidence.values():
            ev[0] *= DECAY
            ev[1] *= DECAY
        for p, v in zip(plans, verdicts, strict=True):
            if p.payload is None:
                continue
            tree, shift = build_tree(p.payload), len(p.tokens) - p.num_logits
            kept = {k - shift for k in v.kv_keep}  # the root and the accepted nodes (tree indices)
            for k, c in enumerate(p.payload, 1):
                key = (shift + len(c), c[-1])  # the head that guessed it, its rank
                proposed[key] += 1
                if tree.parent[k] in kept:  # reached: its parent was accepted
                    self.evidence[key][1] += 1
                    if k in kept:
                        self.evidence[key][0] += 1
                        accepted[key] += 1
        labels = (self.ctx.model_name, self.name)
        metrics = self.ctx.metrics
        for (d, r), n in proposed.items():
            metrics.tree_proposed.labels(*labels, str(d), str(r)).inc(n)
        for (d, r), n in accepted.items():
            metrics.tree_accepted.labels(*labels, str(d), str(r)).inc(n)

    def on_preempt(self, seq: Sequence) -> None:
        seq.strategy_state = None  # the hidden state belongs to K/V that is gone: one plain step first
