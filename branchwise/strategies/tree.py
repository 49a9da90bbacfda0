"""Token trees: drafts that branch, fed in one target forward under a tree mask and verified path by path.

A tree's index 0 is the sequence's (last) pending token, the root; every other node is a drafted token
after its parent. Node i sits at position root + depth[i] and sees the prefix, the root and its ancestors.
Pending tokens before the root (a grammar's forced run) are fed first as the tree's trunk and always kept.
The longest root-to-node path whose tokens the target itself picks is accepted; its K/V is compacted into
the sequence's slots (`Verdict.kv_keep`) and the rest rolled back. Medusa and suffix decoding draft trees.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from branchwise.constraints import apply_bitmask
from branchwise.engine import sampler
from branchwise.engine.plan import ForwardOutput, Plan, Verdict
from branchwise.engine.sequence import Sequence
from branchwise.strategies.base import grammar_masks

if TYPE_CHECKING:
    from branchwise.engine.context import StrategyContext


@dataclass(frozen=True)
class Tree:
    parent: tuple[int, ...]  # (N + 1,) index of each node's parent, parents first; the root's is -1
    depth: np.ndarray  # (N + 1,) root 0
    mask: torch.Tensor  # (N + 1, N + 1) bool: row i sees its ancestors and itself
    paths: tuple[tuple[int, ...], ...]  # root-to-leaf index paths (root excluded), one per leaf


@functools.lru_cache(maxsize=4096)
def tree_of(parent: tuple[int, ...]) -> Tree:
    """The tree of a parent list (parent[0] == -1, every parent before its children)."""
    n = len(parent)
    mask = torch.eye(n, dtype=torch.bool)
    depth = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        mask[i] |= mask[parent[i]]
        depth[i] = depth[parent[i]] + 1
    inner = set(parent)
    paths = []
    for leaf in range(1, n):
        if leaf not in inner:
            path, at = [], leaf
            while at > 0:
                path.append(at)
                at = parent[at]
            paths.append(tuple(reversed(path)))
    return Tree(tuple(parent), depth, mask, tuple(paths))


def tree_plan(seq: Sequence, drafts: list[int], tree: Tree, payload=None) -> Plan:
    """The plan that feeds `seq`'s pending tokens and a tree of drafted tokens (drafts[i] is node i + 1)
    after the last of them, the tree's root (pending tokens before it, a grammar's forced run, its trunk)."""
    pending = seq.token_ids[seq.num_computed :]
    root = seq.num_computed + seq.position_offset + len(pending) - 1
    if len(pending) == 1:
        positions, mask = (root + tree.depth).tolist(), tree.mask
    else:
        positions = list(range(root - len(pending) + 1, root)) + (root + tree.depth).tolist()
        mask = trunk_mask(tree.parent, len(pending) - 1)
    return Plan(
        seq, pending + drafts, len(drafts) + 1, positions=positions, mask=mask, drafts=drafts, payload=payload
    )


@functools.lru_cache(maxsize=1024)
def trunk_mask(parent: tuple[int, ...], trunk: int) -> torch.Tensor:
    """The intra-step mask of `trunk` tokens fed before a tree's root: causal among them, and every tree
    node sees them all."""
    n = trunk + len(parent)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    mask[trunk:, trunk:] = tree_of(parent).mask
    return mask


def nodes(plan: Plan) -> list[int]:
    """The tokens of a tree plan's root and nodes (its logits rows), without the trunk before the root."""
    return plan.tokens[len(plan.tokens) - plan.num_logits :]


def plain_greedy(seq: Sequence) -> bool:
    p = seq.params
    return p.greedy and seq.matcher is None and not p.processes_logits


def grammar_greedy(seq: Sequence) -> bool:
    p = seq.params
    return p.greedy and seq.matcher is not None and not p.processes_logits


def tree_rows(plans: list[Plan], idx: list[int], out: ForwardOutput) -> np.ndarray:
    """The logits rows of the root and every node of the given plans' trees, plan after plan."""
    return np.concatenate([np.arange(plans[i].num_logits) + out.logits_rows[i] for i in idx])


def verify_greedy(plans: list[Plan], idx: list[int], trees: list[Tree], out: ForwardOutput) -> list[Verdict]:
    """Greedy with no penalties or grammar: the target's argmax at every tree row; a node is accepted
    when it is the argmax of its parent's row."""
    if not idx:
        return []
    rows = tree_rows(plans, idx, out)
    best = sampler.argmax(out.logits[torch.from_numpy(rows).to(out.logits.device)]).tolist()
    verdicts, at = [], 0
    for i, tree in zip(idx, trees, strict=True):
        p, fed = plans[i], nodes(plans[i])
        choice = best[at : at + len(fed)]
        at += len(fed)
        ok = [k > 0 and fed[k] == choice[tree.parent[k]] for k in range(len(fed))]
        chain = longest_path(tree.paths, ok)
        verdicts.append(path_verdict(p, out.logits_rows[i], chain, choice[chain[-1] if chain else 0]))
    return verdicts


def verify_paths(
    ctx: StrategyContext,
    plans: list[Plan],
    group: list[tuple[int, tuple[int, ...]]],
    out: ForwardOutput,
    typical: bool = False,
) -> tuple[list[int], list[int]]:
    """The sampler's chain rule over root-to-node paths (plan index, node indices), each gathered into
    consecutive logits rows: (accepted count, next token) per path. `typical`: accept whole paths."""
    rows, first = [], []
    for i, path in group:
        first.append(len(rows))
        rows += [out.logits_rows[i] + r for r in (0, *path)]
    logits = out.logits[torch.tensor(rows, device=out.logits.device)]
    seqs = [plans[i].seq for i, _ in group]
    drafts = [[nodes(plans[i])[r] for r in path] for i, path in group]
    bitmask = None
    if any(s.matcher is not None for s in seqs):
        # a matcher copy per path: the paths of one sequence advance through different tokens
        matchers = [s.matcher.deep_copy() if s.matcher is not None else None for s in seqs]
        bitmask = grammar_masks(ctx, matchers, drafts)
    return sampler.verify_chains(
        logits,
        seqs,
        first,
        drafts,
        [ctx.stop_token_ids(s) for s in seqs],
        None,
        bitmask,
        [len(d) for d in drafts] if typical else None,
    )


def verify_grammar_greedy(
    ctx: StrategyContext, plans: list[Plan], idx: list[int], trees: list[Tree], out: ForwardOutput
) -> list[Verdict]:
    """Greedy with a grammar and no penalties: a node is accepted when it is the grammar's argmax of its
    parent's row. That is the target's own argmax wherever the grammar allows it there (one
    `validate_tokens` on the accepted path): only rows where it does not are masked, most steps none."""
    if not idx:
        return []
    rows = tree_rows(plans, idx, out)
    logits = out.logits[torch.from_numpy(rows).to(out.logits.device)]
    best = sampler.argmax(logits).tolist()
    verdicts, at = [], 0
    for i, tree in zip(idx, trees, strict=True):
        p, fed, matcher = plans[i], nodes(plans[i]), plans[i].seq.matcher
        paths: dict[int, list[int]] = {0: []}  # accepted node -> the drafted tokens from the root to it
        choice: dict[int, int] = {}  # accepted node -> the grammar's argmax of its row
        ok = [False] * len(fed)
        for k in range(1, len(fed)):  # parents before children
            parent = tree.parent[k]
            if parent not in paths:
                continue
            if parent not in choice:
                choice[parent] = _grammar_argmax(ctx, matcher, paths[parent], logits, at + parent, best)
            if fed[k] == choice[parent]:
                ok[k], paths[k] = True, [*paths[parent], fed[k]]
        chain = longest_path(tree.paths, ok)
        last = chain[-1] if chain else 0
        token = (
            choice[last]
            if last in choice
            else _grammar_argmax(ctx, matcher, paths[last], logits, at + last, best)
        )
        verdicts.append(path_verdict(p, out.logits_rows[i], chain, token))
        at += len(fed)
    return verdicts


def _grammar_argmax(
    ctx: StrategyContext, matcher, path: list[int], logits: torch.Tensor, row: int, best: list
) -> int:
    """The argmax of logits[row] among the tokens `matcher` allows after `path` (best[row]: over all)."""
    if matcher.validate_tokens([*path, best[row]]) == len(path) + 1:
        return best[row]
    mask = ctx.grammars().masks([matcher], [path])[-1:]  # the matcher advances through the path and back
    return int(sampler.argmax(apply_bitmask(logits[row : row + 1], mask))[0])


def verify_longest(
    ctx: StrategyContext, plans: list[Plan], idx: list[int], trees: list[Tree], out: ForwardOutput
) -> list[Verdict]:
    """Greedy sequences with penalties or grammars: every root-to-leaf path as a chain, the longest
    accepted one wins (the first of equals); with a grammar and no penalties, `verify_grammar_greedy`."""
    if not idx:
        return []
    masked = [grammar_greedy(plans[i].seq) for i in idx]
    if not any(masked):
        return _verify_paths_longest(ctx, plans, idx, trees, out)
    verdicts: list = [None] * len(idx)
    for want, verify in ((True, verify_grammar_greedy), (False, _verify_paths_longest)):
        part = [j for j in range(len(idx)) if masked[j] is want]
        found = verify(ctx, plans, [idx[j] for j in part], [trees[j] for j in part], out)
        for j, v in zip(part, found, strict=True):
            verdicts[j] = v
    return verdicts


def _verify_paths_longest(
    ctx: StrategyContext, plans: list[Plan], idx: list[int], trees: list[Tree], out: ForwardOutput
) -> list[Verdict]:
    if not idx:
        return []
    group = [(i, path) for i, tree in zip(idx, trees, strict=True) for path in tree.paths]
    num_acc, nxt = verify_paths(ctx, plans, group, out)
    best: dict[int, tuple[int, tuple[int, ...], int]] = {}
    for (i, path), a, t in zip(group, num_acc, nxt, strict=True):
        if i not in best or a > best[i][0]:
            best[i] = (a, path, t)
    return [path_verdict(plans[i], out.logits_rows[i], best[i][1][: best[i][0]], best[i][2]) for i in idx]


def longest_path(paths: tuple[tuple[int, ...], ...], ok: list[bool]) -> tuple[int, ...]:
    """The longest accepted prefix of any root-to-leaf path (the first of equals); ok[k]: node k is
    accepted given its parent."""
    best: tuple[int, ...] = ()
    for path in paths:
        a = 0
        while a < len(path) and ok[path[a]]:
            a += 1
        if a > len(best):
            best = path[:a]
    return best


def path_verdict(plan: Plan, row: int, chain: tuple[int, ...], token: int) -> Verdict:
    """Accept the nodes of `chain` (tree indices, the root 0; the plan's rows start at `row`), then
    `token`; the trunk before the root stays too."""
    trunk = len(plan.tokens) - plan.num_logits
    kept = [0, *chain]
    return Verdict(
        [plan.tokens[trunk + k] for k in chain] + [token],
        [row + k for k in kept],
        list(range(trunk)) + [trunk + k for k in kept],
    )


def prune(seq: Sequence, parent: tuple[int, ...], drafts: list[int]) -> list[int]:
    """The nodes (1-based, parents first) whose path the sequence's grammar accepts; a rejected node's
    subtree goes with it."""
    kept = {0}
    paths = {0: []}
    for k in range(1, len(parent)):
        if parent[k] not in kept:
            continue
        path = paths[parent[k]] + [drafts[k - 1]]
        if seq.matcher.validate_tokens(path) == len(path):
            kept.add(k)
            paths[k] = path
    return sorted(kept - {0})
