"""EAGLE-3 speculative decoding: a one-layer drafter over the target's features from three of its layers.

The target forward keeps, in a fixed buffer, the residual stream entering three of its layers
(`ctx.capture_hidden`); the drafter's first entry at each step reads fc of those, later depths its own
output. Chains are the MTP strategy's: entries in a one-layer K/V pool on the target's block tables (valid
across prefix-cache hits of its own), the chain-drafting loop, the chain rule, constraints and adaptive
K. Draft tokens come from the drafter's draft vocabulary, mapped to target ids (`d2t`).

With `topk` > 1 a greedy request drafts an EAGLE-2 dynamic tree instead: each depth feeds the tree's
expanded nodes so far (tree mask) and expands the `topk` best new nodes by cumulative draft
log-probability, `topk` children each; the tree keeps the best nodes overall whose cumulative draft
probability beats the cost of feeding one (the rule of `speculative.py`), at most `num_draft_tokens`,
and is verified by `strategies/tree.py`. Sampled requests always draft chains (the chain rule with the
drafter's distribution keeps them exact).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import torch

from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.sequence import Sequence
from branchwise.models.eagle3 import find_eagle3, load_eagle3
from branchwise.strategies.base import Resources
from branchwise.strategies.draft import draft_chains
from branchwise.strategies.mtp import MTPState, MTPStrategy
from branchwise.strategies.speculative import parse_k_params
from branchwise.strategies.tree import plain_greedy, prune, tree_of, tree_plan, verify_greedy, verify_longest

if TYPE_CHECKING:
    from branchwise.engine.context import StrategyContext

MAX_TOPK, MAX_TREE = 8, 64
DEFAULT_TREE = 16  # nodes of a tree at most, unless the request says num_draft_tokens


class Eagle3Strategy(MTPStrategy):
    name = "eagle3"
    needs = (
        "strategy 'eagle3' needs an EAGLE-3 drafter: --eagle-model FOLDER (the authors' or the speculators "
        "layout) or an eagle3/ folder beside the model (`branchwise train eagle3`)"
    )

    @classmethod
    def resources(cls, config, model_path, model, dtype, device) -> Resources | None:
        found = find_eagle3(model_path, config.eagle_model)
        if found is None:
            return None
        drafter = load_eagle3(model, found)
        return Resources(drafter, drafter.kv_shape, found)

    def __init__(self, ctx: StrategyContext, resources: Resources | None = None) -> None:
        super().__init__(ctx, resources)  # which fuses the drafter's layer (`fuse`)
        self.feature_width = self.module.fc.weight.shape[1]
        ctx.capture_hidden(self.module.aux_layers)

    def features(self, out: ForwardOutput) -> torch.Tensor:
        return out.aux_hidden

    def parse_params(self, params: dict) -> dict:
        """`num_speculative_tokens` (chain length / tree depth), `topk` (> 1: trees for greedy requests),
        `num_draft_tokens` (most tree nodes)."""
        tree = {k: params[k] for k in ("topk", "num_draft_tokens") if k in params}
        out = parse_k_params(self.name, {k: v for k, v in params.items() if k not in tree})
        for key, top in (("topk", MAX_TOPK), ("num_draft_tokens", MAX_TREE)):
            v = tree.get(key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top):
                raise ValueError(f"{key} must be an integer in [1, {top}]")
        return out | tree

    def _tree_shape(self, seq: Sequence) -> tuple[int, int, int] | None:
        """(topk, depth, most nodes) if `seq` drafts a tree this step, else None."""
        topk = seq.strategy_params.get("topk", 1)
        if topk < 2 or not seq.params.greedy:
            return None
        depth = super().lookahead(seq)  # adaptive K as the depth
        nodes = min(
            seq.strategy_params.get("num_draft_tokens", DEFAULT_TREE),
            self.ctx.max_model_len - seq.num_tokens - 1,
        )
        return (topk, depth, nodes) if depth > 0 and nodes > 1 else None

    def lookahead(self, seq: Sequence) -> int:
        shape = self._tree_shape(seq)
        return super().lookahead(seq) if shape is None else shape[2]

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> list[Plan]:
        shapes = [self._tree_shape(s) if b > 2 else None for s, b in zip(seqs, budgets, strict=True)]
        trees = [i for i, shape in enumerate(shapes) if shape is not None]  # decided once: drafting
        chains = [i for i, shape in enumerate(shapes) if shape is None]  # chains moves the cost model
        plans: list[Plan | None] = [None] * len(seqs)
        if chains:
            found = draft_chains(self.ctx, self, [seqs[i] for i in chains], [budgets[i] for i in chains])
            for i, p in zip(chains, found, strict=True):
                plans[i] = p
        if trees:
            found = self._draft_trees(
                [seqs[i] for i in trees], [budgets[i] for i in trees], [shapes[i] for i in trees]
            )
            for i, p in zip(trees, found, strict=True):
                plans[i] = p
        self.k.drafting |= any(p.drafts for p in plans)
        return plans

    @torch.inference_mode()
    def _draft_trees(
        self, seqs: list[Sequence], budgets: list[int], shapes: list[tuple[int, int, int]]
    ) -> list[Plan]:
        """EAGLE-2 dynamic trees, one batched drafter forward per depth (see the module docstring)."""
        logits, carried = self.draft_forward([self.draft_plan(s, 0, [], None) for s in seqs])
        top = self._top(logits, max(s[0] for s in shapes))
        # per sequence: nodes as (cumulative logp, token, parent index (0: the root), depth); the inputs of
        # expanded nodes; which nodes are expanded (fed), in order
        nodes: list[list[tuple[float, int, int, int]]] = [[] for _ in seqs]
        frontier: list[list[int]] = [[] for _ in seqs]
        inputs: list[dict[int, torch.Tensor]] = [{} for _ in seqs]
        fed: list[list[int]] = [[] for _ in seqs]
        limit = [min(b - 1, shape[2]) for b, shape in zip(budgets, shapes, strict=True)]
        threshold = self.k.threshold(self.draft_cost())
        for b, (topk, _, _) in enumerate(shapes):
            self._expand(nodes[b], frontier[b], inputs[b], top[b], carried[b], 0, 0.0, topk)
        for depth in range(1, max(s[1] for s in shapes)):
            active = [b for b, s in enumerate(shapes) if depth < min(s[1], limit[b] // s[0]) and frontier[b]]
            if not active:
                break
            plans = []
            for b in active:
                topk = shapes[b][0]
                best = heapq.nlargest(topk, frontier[b], key=lambda n: nodes[b][n - 1][0])
                fed[b] = fed[b] + best  # earlier depths' expanded nodes, then this depth's: the outputs
                frontier[b] = []
                plans.append(self._tree_step(seqs[b], nodes[b], fed[b], inputs[b], len(best)))
            logits, carried = self.draft_forward(plans)
            top = self._top(logits, max(shapes[b][0] for b in active))
            row = 0
            for b, plan in zip(active, plans, strict=True):
                for n in fed[b][-plan.num_logits :]:
                    cum = nodes[b][n - 1][0]
                    self._expand(
                        nodes[b], frontier[b], inputs[b], top[row], carried[row], n, cum, shapes[b][0]
                    )
                    row += 1
        return [self._final(s, nodes[b], limit[b], threshold) for b, s in enumerate(seqs)]

    @staticmethod
    def _top(logits: torch.Tensor, k: int) -> list[list[tuple[float, int]]]:
        """Each row's k best (log-probability, token): one top-k and one device-to-host copy per depth."""
        values, tokens = torch.log_softmax(logits.float(), -1).topk(k)
        return [list(zip(v, t, strict=True)) for v, t in zip(values.tolist(), tokens.tolist(), strict=True)]

    def _expand(self, nodes, frontier, inputs, top, hidden, parent: int, cum: float, topk: int) -> None:
        """The `topk` children of node `parent` (0: the root) from its entry's best tokens."""
        depth = nodes[parent - 1][3] + 1 if parent else 1
        for v, t in top[:topk]:
            nodes.append((cum + v, t, parent, depth))
            frontier.append(len(nodes))
            inputs[len(nodes)] = hidden  # a child's entry reads its parent's output

    def _tree_step(self, seq: Sequence, nodes, fed: list[int], inputs, num_new: int) -> Plan:
        """Feed the expanded nodes (each after its parent) under a tree mask; logits for the last ones."""
        parent = [-1] + [fed.index(nodes[n - 1][2]) + 1 if nodes[n - 1][2] else 0 for n in fed]
        tree = tree_of(tuple(parent))
        start, bs = seq.num_tokens, self.ctx.block_size  # slots after the pending token's entry
        for block in range(start // bs, (start + len(fed) - 1) // bs + 1):
            self.written.pop(seq.block_table[block], None)
        positions = (seq.num_computed + seq.position_offset + tree.depth[1:]).tolist()
        st: MTPState = seq.strategy_state
        return Plan(
            seq,
            [nodes[n - 1][1] for n in fed],
            num_logits=num_new,
            positions=positions,
            mask=tree.mask[1:, 1:],
            start=start,
            first_block=st.first_block,
            payload=torch.stack([inputs[n] for n in fed]),
        )

    def _final(self, seq: Sequence, nodes, limit: int, threshold: float) -> Plan:
        """The best nodes by cumulative draft probability above `threshold` (an ancestor is never worse than
        its descendant, so they form a tree), parents first; pruned by the grammar; as a target plan."""
        fixed = "num_speculative_tokens" in seq.strategy_params
        floor = -float("inf") if fixed else torch.tensor(max(threshold, 1e-12)).log().item()
        ranked = sorted(range(1, len(nodes) + 1), key=lambda n: (-nodes[n - 1][0], n))
        best = [n for n in ranked[:limit] if nodes[n - 1][0] > floor]
        keep: list[int] = []
        for n in sorted(best, key=lambda n: (nodes[n - 1][3], n)):  # parents first; never an orphan
            if nodes[n - 1][2] == 0 or nodes[n - 1][2] in keep:
                keep.append(n)
        index = {n: i for i, n in enumerate(keep, 1)}
        parent = (-1, *(index.get(nodes[n - 1][2], 0) for n in keep))
        drafts = [nodes[n - 1][1] for n in keep]
        if drafts and seq.matcher is not None:
            kept = prune(seq, parent, drafts)
            renumber = {0: 0, **{k: j for j, k in enumerate(kept, 1)}}
            drafts, parent = [drafts[k - 1] for k in kept], (-1, *(renumber[parent[k]] for k in kept))
        if not drafts:
            return Plan(seq, seq.token_ids[seq.num_computed :])
        tree = tree_of(parent)
        return tree_plan(seq, drafts, tree, payload=tree)

    def verify(self, plans: list[Plan], out: ForwardOutput) -> list[Verdict]:
        trees = [i for i, p in enumerate(plans) if p.payload is not None]
        if not trees:
            return super().verify(plans, out)
        chains = [i for i in range(len(plans)) if i not in set(trees)]
        verdicts: list[Verdict | None] = [None] * len(plans)
        if chains:
            for i, v in zip(chains, super().verify([plans[i] for i in chains], out.of(chains)), strict=True):
                verdicts[i] = v
        fast = [i for i in trees if plain_greedy(plans[i].seq)]
        other = [i for i in trees if i not in set(fast)]
        found = verify_greedy(plans, fast, [plans[i].payload for i in fast], out)
        found += verify_longest(self.ctx, plans, other, [plans[i].payload for i in other], out)
        for i, v in zip(fast + other, found, strict=True):
            verdicts[i] = v
            p, st = plans[i], self.state(plans[i].seq)
            self.k.observe(st, int(p.payload.depth.max()), len(v.tokens) - 1)
            # the target rows of the kept tokens, in order (a new list: a retry's snapshot holds the old one)
            kept = st.hidden[-1][v.kv_keep]
            st.held += len(kept) - len(st.hidden[-1])
            st.hidden = [*st.hidden[:-1], kept]
            st.computed = min(st.computed, p.start + 1)  # entries after the root: recomputed from features
        return verdicts
