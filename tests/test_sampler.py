"""Sampling follows the processed distribution; speculative acceptance keeps the target's distribution."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chisquare

from branchwise.engine import sampler
from branchwise.engine.sequence import SamplingParams, Sequence

V = 8


def make_seqs(
    n: int, params: SamplingParams, seed: int = 0, output: list[int] | None = None
) -> list[Sequence]:
    prompt = [1, 2]
    return [
        Sequence(
            i,
            str(i),
            0,
            prompt + (output or []),
            len(prompt),
            params,
            "ar",
            torch.Generator().manual_seed(seed * 100003 + i),
        )
        for i in range(n)
    ]


def expected_probs(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """An independent numpy rendering of vLLM's order: temperature, top-k, top-p, then min-p."""
    x = logits / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.ones(len(x), dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    p = np.exp(x - x.max())
    p /= p.sum()
    cum = 0.0
    for i, t in enumerate(order):
        if i > 0 and cum >= top_p:
            keep[t] = False
        cum += p[t]
    p = np.where(keep, np.exp(x - x.max()), 0)
    p /= p.sum()
    if min_p:
        p = np.where(p < min_p * p.max(), 0, p)
        p /= p.sum()
    return p


def counts_of(tokens: list[int]) -> np.ndarray:
    return np.bincount(np.array(tokens), minlength=V)


def assert_matches(tokens: list[int], probs: np.ndarray) -> None:
    observed = counts_of(tokens)
    support = probs > 0
    assert observed[~support].sum() == 0, "sampled a token outside the support"
    expected = probs[support].astype(np.float64)
    expected = expected / expected.sum() * observed.sum()
    _, pvalue = chisquare(observed[support], expected)
    assert pvalue > 1e-3, (observed, probs * len(tokens))


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.2])


def test_sampling_with_temperature_top_k_top_p_min_p_matches_the_distribution():
    n = 20000
    for kw in [
        dict(temperature=0.8),
        dict(temperature=1.2, top_k=4),
        dict(top_p=0.75),
        dict(min_p=0.2),
        dict(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05),
    ]:
        seqs = make_seqs(n, SamplingParams(**kw))
        _, tokens = sampler.verify_chains(LOGITS.expand(n, V), seqs, range(n), [[]] * n, [set()] * n)
        assert_matches(tokens, expected_probs(LOGITS.numpy(), **kw))


def test_greedy_takes_the_argmax():
    seqs = make_seqs(3, SamplingParams(temperature=0))
    logits = torch.randn(3, V)
    _, tokens = sampler.verify_chains(logits, seqs, range(3), [[]] * 3, [set()] * 3)
    assert tokens == logits.argmax(-1).tolist()


def _speculate(draft_probs: torch.Tensor | None, fixed_drafts: list[int] | None, n: int = 30000):
    """Run verify_chains on n sequences with K=2 drafts; returns the first two emitted tokens of each."""
    target = torch.stack([LOGITS, LOGITS.flip(0), LOGITS * 0.3])  # p differs per position
    seqs = make_seqs(n, SamplingParams(temperature=1.0), seed=1)
    gen = torch.Generator().manual_seed(5)
    if draft_probs is not None:
        drafts = torch.stack(
            [torch.multinomial(draft_probs[k], n, replacement=True, generator=gen) for k in range(2)], 1
        ).tolist()
        probs = draft_probs.expand(n, 2, V)
    else:
        drafts, probs = [fixed_drafts] * n, None
    logits = target.repeat(n, 1)
    num_acc, nxt = sampler.verify_chains(logits, seqs, range(0, 3 * n, 3), drafts, [set()] * n, probs)
    emitted = [d[:a] + [t] for d, a, t in zip(drafts, num_acc, nxt, strict=True)]
    p = target.softmax(-1).numpy()
    return emitted, p, num_acc


def test_speculative_sampling_with_a_draft_distribution_keeps_the_target_distribution():
    q = torch.tensor([[0.3, 0.05, 0.05, 0.2, 0.1, 0.1, 0.1, 0.1], [0.1] * 7 + [0.3]])
    emitted, p, num_acc = _speculate(q, None)
    assert_matches([e[0] for e in emitted], p[0])
    assert_matches([e[1] for e in emitted if len(e) > 1], p[1])
    assert_matches([e[2] for e in emitted if len(e) > 2], p[2])  # the bonus token
    alpha = np.minimum(p[0], q[0].numpy()).sum()  # acceptance of the first draft = sum min(p, q)
    assert abs(np.mean(np.array(num_acc) >= 1) - alpha) < 0.01


def test_speculative_sampling_with_a_deterministic_drafter_keeps_the_target_distribution():
    emitted, p, num_acc = _speculate(None, [0, 7])  # n-gram style: q is a point mass on each draft
    assert_matches([e[0] for e in emitted], p[0])
    assert_matches([e[1] for e in emitted if len(e) > 1], p[1])
    assert abs(np.mean(np.array(num_acc) >= 1) - p[0][0]) < 0.01


def test_greedy_verification_accepts_while_drafts_equal_the_argmax():
    logits = torch.randn(4, V)
    best = logits.argmax(-1).tolist()
    seqs = make_seqs(1, SamplingParams(temperature=0))
    drafts = [[best[0], best[1], (best[2] + 1) % V]]
    num_acc, nxt = sampler.verify_chains(logits, seqs, [0], drafts, [set()])
    assert num_acc == [2] and nxt == [best[2]]
    num_acc, nxt = sampler.verify_chains(logits, seqs, [0], [best[:3]], [set()])
    assert num_acc == [3] and nxt == [best[3]]  # all accepted: the bonus token


def test_penalties_count_drafted_tokens_before_each_row():
    params = SamplingParams(
        temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    seqs = make_seqs(1, params, output=[3, 3])
    logits = torch.full((1, 3, V), 1.0)
    drafts = torch.tensor([[4, 5]])
    out = sampler.apply_penalties(logits.clone(), seqs, drafts, [set()])
    # row 0 sees outputs [3, 3] (and prompt tokens 1, 2); row 1 also draft 4; row 2 drafts 4 and 5
    assert out[0, 0, 3] == 1.0 / 2 - 0.5 * 2 - 0.25
    assert out[0, 0, 1] == 0.5 and out[0, 0, 4] == 1.0
    assert out[0, 1, 4] == 0.5 - 0.5 - 0.25 and out[0, 1, 5] == 1.0
    assert out[0, 2, 5] == 0.5 - 0.5 - 0.25


def test_min_tokens_blocks_stop_tokens_until_reached():
    seqs = make_seqs(1, SamplingParams(temperature=0, min_tokens=2), output=[5])
    logits = torch.zeros(1, 3, V)
    logits[..., 6] = 10.0  # the stop token is the favourite everywhere
    out = sampler.apply_penalties(logits, seqs, torch.tensor([[0, 0]]), [{6}])
    assert out[0, 0, 6] == float("-inf") and out[0, 1, 6] == 10.0
