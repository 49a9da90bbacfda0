"""Sampling and speculative verification: one rule for every chain of drafted tokens.

Autoregressive decoding is the zero-draft case of `verify_chains`. With drafts, acceptance follows
speculative sampling (Leviathan et al.; Chen et al.): accept draft x with probability min(1, p(x)/q(x)),
on the first rejection sample from norm(max(0, p - q)), and after K acceptances sample a bonus token from
p. A deterministic drafter (n-gram, greedy heads) has q = one-hot; greedy rows have p = one-hot of the
argmax, which makes the rule "accept while the draft equals the target's argmax".

Random numbers come from each sequence's own CPU generator, so a seeded sequence draws the same numbers
whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np
import torch

from branchwise.constraints import apply_bitmask
from branchwise.engine.sequence import Sequence


def argmax(x: torch.Tensor) -> np.ndarray:
    """Argmax over the last dim, on the host: numpy's on CPU float32 (vectorized; torch's CPU argmax is not,
    10x slower on a batch of rows). Both take the first of equal maxima."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return x.numpy().argmax(-1)
    return x.argmax(-1).cpu().numpy()


def _on_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list on the device without waiting for the stream (`torch.tensor(..., device=cuda)`
    syncs; a non-blocking copy from pageable memory is staged and returns)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _param(seqs: Seq[Sequence], name: str, device: torch.device) -> torch.Tensor:
    return _on_device([getattr(s.params, name) for s in seqs], device, torch.float32)


def logit_bias(seqs: Seq[Sequence], vocab: int, device: torch.device) -> torch.Tensor:
    """(B, V) float32: each sequence's logit_bias, built on the host and moved once."""
    bias = torch.zeros(len(seqs), vocab)
    for b, s in enumerate(seqs):
        if s.params.logit_bias:
            bias[b, list(s.params.logit_bias)] = torch.tensor(
                list(s.params.logit_bias.values()), dtype=bias.dtype
            )
    return bias.to(device)


def apply_penalties(
    logits: torch.Tensor, seqs: Seq[Sequence], drafts: torch.Tensor, stop_ids: Seq[set[int]]
) -> torch.Tensor:
    """logit_bias, presence/frequency/repetition penalties and min_tokens over (B, P, V) logits (float32).

    Row p of sequence b comes after the sequence's output tokens plus drafts[b, :p], so those drafts
    count as generated tokens there, exactly as they would have in autoregressive decoding.
    """
    B, P, V = logits.shape
    device = logits.device
    logits = logits.float()
    if any(s.params.logit_bias for s in seqs):
        logits = logits + logit_bias(seqs, V, device)[:, None]
    if any(s.params.has_penalties for s in seqs):
        counts = torch.zeros(B, P, V, device=device)
        prompt_seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for b, s in enumerate(seqs):
            if s.params.has_penalties:
                out = torch.tensor(s.output_token_ids, dtype=torch.long, device=device)
                counts[b] += torch.bincount(out, minlength=V)[:V].float()
                prompt_seen[b, torch.tensor(s.token_ids[: s.num_prompt_tokens], device=device)] = True
        for j in range(P - 1):  # drafts[:, j] precedes rows j+1..P-1
            idx = drafts[:, j].view(B, 1, 1).expand(B, P - 1 - j, 1)
            counts[:, j + 1 :].scatter_add_(-1, idx, torch.ones(B, P - 1 - j, 1, device=device))
        freq = _param(seqs, "frequency_penalty", device).view(B, 1, 1)
        pres = _param(seqs, "presence_penalty", device).view(B, 1, 1)
        rep = _param(seqs, "repetition_penalty", device).view(B, 1, 1)
        seen = (counts > 0) | prompt_seen[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - freq * counts - pres * (counts > 0).float()
    for b, s in enumerate(seqs):
        short = s.params.min_tokens - s.num_output_tokens  # rows p < short may not stop
        if short > 0 and stop_ids[b]:
            logits[b, :short, torch.tensor(sorted(stop_ids[b]), device=device)] = float("-inf")
    return logits


def target_probs(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """(B, P, V) processed logits -> the distribution each row samples from (one-hot argmax if greedy)."""
    B, P, V = logits.shape
    device = logits.device
    greedy = _on_device([s.params.greedy for s in seqs], device).view(B, 1, 1)
    temp = _on_device([s.params.temperature or 1.0 for s in seqs], device).view(B, 1, 1)
    x = logits.float() / temp  # float32: 1/T reaches 1e5, past float16's range
    top_k = _on_device([s.params.top_k or V for s in seqs], device).view(B, 1, 1)
    top_p = _param(seqs, "top_p", device).view(B, 1, 1)
    if any(s.params.top_k or s.params.top_p < 1 for s in seqs if not s.params.greedy):
        sorted_x, order = x.sort(-1, descending=True)
        sorted_p = sorted_x.softmax(-1)
        rank = torch.arange(V, device=device)
        drop = (rank >= top_k) | ((sorted_p.cumsum(-1) - sorted_p) >= top_p)
        drop[..., 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    if any(s.params.min_p > 0 for s in seqs):  # decided on the host: no read of the device
        min_p = _param(seqs, "min_p", device).view(B, 1, 1)
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)


def _uniforms(seqs: Seq[Sequence], num_drafts: Seq[int], width: int) -> torch.Tensor:
    """(B, width) uniforms: K_b for the acceptance tests and one to sample with, from each sampling
    sequence's own generator; 0.5 for greedy rows (their distributions are one-hot)."""
    u = torch.full((len(seqs), width), 0.5)
    for b, (s, k) in enumerate(zip(seqs, num_drafts, strict=True)):
        if not s.params.greedy:
            u[b, : k + 1] = torch.rand(k + 1, generator=s.generator)
    return u


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: (B, V) probabilities (unnormalised is fine), (B,) uniforms in [0, 1)."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    return idx[:, 0].clamp(max=probs.shape[-1] - 1)


def next_tokens(logits: torch.Tensor, seqs: Seq[Sequence], rows: Seq[int]) -> torch.Tensor:
    """(B,) the token each sequence samples from its row, left on the device (async scheduling): rows
    without drafts, logits processing or a grammar; the same numbers `verify_chains` draws for them."""
    x = logits[_on_device(list(rows), logits.device)]
    if all(s.params.greedy for s in seqs):
        return x.argmax(-1)
    p = target_probs(x[:, None], seqs)[:, 0]
    return sample_from(p, _uniforms(seqs, [0] * len(seqs), 1)[:, 0].to(logits.device, non_blocking=True))


def verify_chains(
    logits: torch.Tensor,
    seqs: Seq[Sequence],
    first_rows: Seq[int],
    drafts: Seq[Seq[int]],
    stop_ids: Seq[set[int]],
    draft_probs: torch.Tensor | None = None,
    bitmask: torch.Tensor | None = None,
    accepted: Seq[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Accept a prefix of each sequence's drafted chain and sample the token after it.

    logits: (R, V); sequence b's K_b + 1 rows start at first_rows[b] (row k scores the token after draft k).
    draft_probs: (B, K, V) drafter distributions, or None for a deterministic drafter.
    bitmask: (B, K + 1, V/32) int32 grammar bitmasks per row (a set bit allows its token), or None.
    accepted: drafts already accepted by another rule (Medusa's typical acceptance, lossy): each chain's
    drafts are kept as they are and only the token after them is sampled.
    Returns (num_accepted, next_token) per sequence.
    """
    B = len(seqs)
    device = logits.device
    plain = bitmask is None and not any(s.params.processes_logits for s in seqs)
    greedy = all(s.params.greedy for s in seqs)
    if plain and greedy and not any(drafts):  # autoregressive greedy: one argmax, one read
        whole = len(first_rows) == logits.shape[0] and all(r == i for i, r in enumerate(first_rows))
        x = logits if whole else logits[torch.tensor(list(first_rows), device=device)]
        return [0] * B, argmax(x).tolist()
    # index arrays are built on the host and cross to the device once
    k_np = np.array([len(d) for d in drafts], dtype=np.int64)
    K = int(k_np.max(initial=0))
    pos_np = np.arange(K + 1)
    rows_np = np.asarray(first_rows, dtype=np.int64)[:, None] + np.minimum(pos_np[None], k_np[:, None])
    draft_np = np.zeros((B, max(K, 1)), dtype=np.int64)
    for b, d in enumerate(drafts):
        draft_np[b, : len(d)] = d
    draft_t = torch.from_numpy(draft_np).to(device)
    x = logits[torch.from_numpy(rows_np).to(device)]  # (B, K+1, V)
    if not plain:
        if any(s.params.processes_logits for s in seqs):
            x = apply_penalties(x, seqs, draft_t, stop_ids)
        if bitmask is not None:
            x = apply_bitmask(x, bitmask)
    if greedy:
        # p is one-hot: accept while the draft is the argmax; one read of the argmaxes, the rest on the host
        best = argmax(x)  # (B, K+1)
        accept = (draft_np[:, :K] == best[:, :K]) & (pos_np[None, :K] < k_np[:, None])
        num_acc = accept.cumprod(1).sum(1)
        return num_acc.tolist(), best[np.arange(B), num_acc].tolist()
    k_t = torch.from_numpy(k_np).to(device)
    pos = torch.arange(K + 1, device=device)
    p = target_probs(x, seqs)
    u = _uniforms(seqs, k_np.tolist(), K + 1).to(device)
    if accepted is not None:
        num_acc = torch.tensor(list(accepted), device=device)
    elif K:
        p_d = p[:, :K].gather(-1, draft_t[:, :K, None])[..., 0]  # (B, K)
        q_d = 1.0 if draft_probs is None else draft_probs.gather(-1, draft_t[:, :K, None])[..., 0]
        accept = (u[:, :K] * q_d < p_d) & (pos[None, :K] < k_t[:, None])
        num_acc = accept.int().cumprod(1).sum(1)
    else:
        num_acc = torch.zeros(B, dtype=torch.long, device=device)
    final = p[torch.arange(B, device=device), num_acc]  # (B, V)
    rejected = num_acc < k_t
    if bool(rejected.any()):
        at = num_acc.clamp(max=max(K - 1, 0))
        if draft_probs is None:
            q = torch.zeros_like(final).scatter_(
                -1, draft_t[torch.arange(B, device=device), at][:, None], 1.0
            )
        else:
            q = draft_probs[torch.arange(B, device=device), at]
        residual = (final - q).clamp(min=0)
        usable = rejected & (residual.sum(-1) > 0)
        final = torch.where(usable[:, None], residual, final)
    # the last of each sequence's K_b + 1 uniforms: never one that an acceptance test already used
    next_tok = sample_from(final, u[torch.arange(B, device=device), k_t])
    return num_acc.tolist(), next_tok.tolist()


def logprobs_of(logits: torch.Tensor, tokens: Seq[int], top: Seq[int]) -> list[dict]:
    """The model's own log-probabilities (log_softmax of raw logits) of each row's chosen token and top-k."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen_t = lp.gather(-1, torch.tensor(list(tokens), device=lp.device)[:, None])  # (R, 1)
    ranks = (lp > chosen_t).sum(-1).add(1).tolist()
    chosen = chosen_t[:, 0].tolist()
    k = max(top, default=0)
    top_vals, top_ids = lp.topk(k, -1) if k else (lp[:, :0], lp[:, :0].long())
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    return [
        {
            "token_id": t,
            "logprob": c,
            "rank": rank,  # 1 = the most likely token
            "top": list(zip(top_ids[r][: top[r]], top_vals[r][: top[r]], strict=True)),
        }
        for r, (t, c, rank) in enumerate(zip(tokens, chosen, ranks, strict=True))
    ]
