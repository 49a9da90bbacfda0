"""PyTorch references of the kernels: exact, any device, and the twins the Triton kernels match."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from branchwise.kernels.metadata import AttentionMetadata

SHORT_QUERY = 32  # sequences with at most this many new tokens are padded into one batched attention


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    splits: int,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """(M, K) x (N, K) weight (+ bias) -> (M, N); the tiling arguments only shape the Triton twin's work."""
    return F.linear(x, weight, bias)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each new token's K/V (T, Hkv, D) into its slot of the caches (blocks, block_size, Hkv, D)."""
    if key.dtype != k_cache.dtype:
        key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


@dataclass
class _Group:
    """Sequences whose queries are padded to one (G, Q) batch, with keys gathered to (G, S)."""

    q_index: torch.Tensor  # (G, Q) token index of each padded query
    kv_blocks: torch.Tensor  # (G, ceil(S / block_size)) the blocks holding each sequence's keys, in order
    num_keys: int  # S: keys per sequence (the longest's; shorter ones' extra keys are masked)
    valid: torch.Tensor | None  # (n,) flat indices into G*Q of real queries, in token order
    token_index: torch.Tensor | None  # (n,) their token indices (None for both: in order)
    mask: torch.Tensor | None  # (G, 1, Q, S) bool: query may see key (None: a decode group's, made on use)
    query_pos: torch.Tensor | None  # (G, Q, 1)
    key_pos: torch.Tensor | None  # (G, 1, S)
    windowed: dict = field(default_factory=dict)  # additive masks by (sliding window, dtype)
    cached: int | None = None  # one sequence, plain causal: its keys before this step's (no mask needed)
    first_slot: int | None = None  # ... and its keys lie in consecutive slots from here (no gather needed)
    in_order: bool = False  # every sequence, one new token each: token g is query g (no gather, no scatter)
    # on the CPU the mask, and the positions a sliding window compares, are made on first use
    make_mask: Callable[[], torch.Tensor] | None = None
    make_positions: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None

    def bias_for(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (0 / -inf; SDPA is faster with it than with booleans), built once per step."""
        key = (sliding_window or 0, dtype)
        if key not in self.windowed:
            if self.mask is None:
                self.mask = self.make_mask()
            mask = self.mask
            if sliding_window:
                if self.query_pos is None:
                    self.query_pos, self.key_pos = self.make_positions()
                # real rows always keep their own key; padded rows may go empty (NaN), and are discarded
                mask = mask & ((self.query_pos - self.key_pos) < sliding_window)[:, None]
            self.windowed[key] = torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device)
            self.windowed[key].masked_fill_(mask, 0.0)
        return self.windowed[key]


def _host_group(meta: AttentionMetadata, seqs: list[int]) -> _Group:
    """`_group` on the CPU, built with numpy on the host arrays: a step's gather indices cost a few numpy
    calls, not dozens of small tensor ops (every step pays them, a chain drafter at every depth). The mask
    and the positions a sliding window compares are made only if some layer needs them."""
    qs, seq_len = meta.query_start.numpy(), meta.seq_lens.numpy()  # CPU tensors: views, no list reads
    start, q_len, tables = qs[:-1], np.diff(qs), meta.block_tables.numpy()
    every = len(seqs) == meta.num_seqs  # seqs are in order: all of them is every sequence, as fed
    if every:
        Q, S = meta.max_query_len, meta.max_seq_len
    else:
        start, q_len, seq_len, tables = start[seqs], q_len[seqs], seq_len[seqs], tables[seqs]
        Q, S = int(q_len.max()), int(seq_len.max())
    G, bs = len(seqs), meta.block_size
    num_blocks = -(-S // bs)
    if num_blocks <= tables.shape[1]:
        kv_blocks = tables[:, :num_blocks].astype(np.int64)
    else:
        kv_blocks = tables[:, np.minimum(np.arange(num_blocks), tables.shape[1] - 1)].astype(np.int64)
    num_cached = first_slot = None
    if G == 1 and meta.mask_offsets_host[seqs[0]] < 0:
        num_cached = S - Q
        if num_blocks == 1 or (np.diff(kv_blocks[0]) == 1).all():
            first_slot = int(kv_blocks[0, 0]) * bs
    i = np.arange(Q)
    real = i[None, :] < q_len[:, None]  # (G, Q)
    q_index = start[:, None] + np.minimum(i[None, :], q_len[:, None] - 1)  # (G, Q)
    in_order = every and Q == 1

    j = np.arange(S)

    def key_index() -> np.ndarray:
        """(G, S) each key's index among the sequence's new tokens (made on use: G x S values)."""
        return j[None, :] - (seq_len - q_len)[:, None]

    def make_mask() -> torch.Tensor:
        """(G, 1, Q, S): every cached key, and the new ones causally or by the sequence's own mask."""
        if Q == 1:
            return torch.from_numpy((j[None, :] < seq_len[:, None])[:, None, None])
        new = key_index()[:, None, :]  # (G, 1, S)
        mask = (new < 0) | (new <= i[None, :, None]) & (j < seq_len[:, None])[:, None, :]  # (G, Q, S)
        custom = meta.custom_mask.numpy()
        for g, b in enumerate(seqs):
            if (off := meta.mask_offsets_host[b]) >= 0:
                n = int(q_len[g])
                c = int(seq_len[g]) - n
                mask[g, :n, c : c + n] = custom[off : off + n * n].reshape(n, n)
        mask &= real[:, :, None]
        mask[:, :, 0] |= ~real  # padded rows see key 0 only
        return torch.from_numpy(mask[:, None])

    def make_positions() -> tuple[torch.Tensor, torch.Tensor]:
        """(G, Q, 1) query and (G, 1, S) key positions (cached keys: their index)."""
        positions = meta.positions.numpy()
        rel = key_index()
        new = (rel >= 0) & (rel < q_len[:, None])  # keys written this step
        new_idx = np.minimum(start[:, None] + np.maximum(rel, 0), len(positions) - 1)
        key_pos = np.where(new, positions[new_idx], j[None, :])
        return torch.from_numpy(positions[q_index][:, :, None]), torch.from_numpy(key_pos[:, None, :])

    return _Group(
        q_index=torch.from_numpy(q_index),
        kv_blocks=torch.from_numpy(kv_blocks),
        num_keys=S,
        valid=None if in_order else torch.from_numpy((np.arange(G)[:, None] * Q + i[None, :])[real]),
        token_index=None if in_order else torch.from_numpy(q_index[real]),
        mask=None,
        query_pos=None,
        key_pos=None,
        cached=num_cached,
        first_slot=first_slot,
        in_order=in_order,
        make_mask=make_mask,
        make_positions=make_positions,
    )


def _group(meta: AttentionMetadata, seqs: list[int], device: torch.device) -> _Group:
    if device.type == "cpu":
        return _host_group(meta, seqs)
    qs, lens, offs = meta.query_start_host, meta.seq_lens_host, meta.mask_offsets_host
    q_lens = [qs[b + 1] - qs[b] for b in seqs]
    Q, S, G = max(q_lens), max(lens[b] for b in seqs), len(seqs)
    sel = torch.tensor(seqs, device=device)
    q_len = torch.tensor(q_lens, device=device)[:, None]  # (G, 1)
    start = meta.query_start[sel].long()[:, None]
    seq_len = meta.seq_lens[sel].long()[:, None]
    i = torch.arange(Q, device=device)[None, :]  # (1, Q)
    real = i < q_len  # (G, Q)
    q_index = start + torch.minimum(i, q_len - 1)
    j = torch.arange(S, device=device)
    bs = meta.block_size
    tables = meta.block_tables[sel].long()
    kv_blocks = tables[:, torch.arange(-(-S // bs), device=device).clamp(max=tables.shape[1] - 1)]

    num_cached, first_slot = None, None  # (found by host reads: the CPU's `_host_group` only)
    if Q == 1:  # decode: each query sees all of its sequence's keys, itself last
        mask = (j[None, :] < seq_len)[:, None, None]  # (G, 1, 1, S)
        key_pos = j[None, None, :].expand(G, 1, S)
        return _Group(
            q_index=q_index,
            kv_blocks=kv_blocks,
            num_keys=S,
            valid=torch.arange(G, device=device),
            token_index=q_index[:, 0],
            mask=mask,
            query_pos=meta.positions[q_index][:, :, None],
            key_pos=key_pos,
            cached=num_cached,
            first_slot=first_slot,
        )
    cached = (seq_len - q_len)[:, :, None]  # (G, 1, 1)
    rel = j[None, None, :] - cached  # key index among the new tokens
    qi = i[:, :, None]
    mask = (rel < 0) | ((rel <= qi) & (j[None, None, :] < seq_len[:, :, None]))  # causal
    for g, b in enumerate(seqs):
        if offs[b] >= 0:
            n, c = q_lens[g], lens[b] - q_lens[g]
            custom = meta.custom_mask[offs[b] : offs[b] + n * n].view(n, n)
            mask[g, :n, c : c + n] = custom
    mask &= real[:, :, None]
    mask[:, :, 0] |= ~real  # padded rows see key 0 only

    query_pos = meta.positions[q_index]  # (G, Q)
    key_pos = j[None, :].expand(G, S).clone()
    new = (rel[:, 0, :] >= 0) & (rel[:, 0, :] < q_len)  # (G, S) keys written this step
    new_idx = (start + rel[:, 0, :].clamp(min=0)).clamp(max=meta.positions.shape[0] - 1)
    key_pos = torch.where(new, meta.positions[new_idx], key_pos)
    flat = (torch.arange(G, device=device)[:, None] * Q + i).masked_select(real)
    return _Group(
        q_index=q_index,
        kv_blocks=kv_blocks,
        num_keys=S,
        valid=flat,
        token_index=q_index.masked_select(real),
        mask=mask[:, None],
        query_pos=query_pos[:, :, None],
        key_pos=key_pos[:, None, :],
        cached=num_cached,
        first_slot=first_slot,
    )


def _groups(meta: AttentionMetadata, device: torch.device) -> list[_Group]:
    if "reference" not in meta.cache:
        qs = meta.query_start_host
        q_len = [qs[b + 1] - qs[b] for b in range(meta.num_seqs)]
        # one-token queries apart from the few-token ones (drafts): padded in with them, each would cost
        # as many query rows as the longest draft
        single = [b for b, n in enumerate(q_len) if n == 1]
        short = [b for b, n in enumerate(q_len) if 1 < n <= SHORT_QUERY]
        long = [b for b, n in enumerate(q_len) if n > SHORT_QUERY]
        meta.cache["reference"] = [_group(meta, seqs, device) for seqs in (single, short) if seqs] + [
            _group(meta, [b], device) for b in long
        ]
    return meta.cache["reference"]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of new tokens (T, Hq, D) over their sequences' cached + new K/V; returns (T, Hq, D)."""
    T, Hq, D = query.shape
    Hkv = k_cache.shape[2]
    out = None
    for g in _groups(meta, query.device):
        (G, nb), S, bs = g.kv_blocks.shape, g.num_keys, k_cache.shape[1]
        # (G, Hq, Q, D): in order (one query each), the tokens themselves with Q = 1
        q = query.unsqueeze(2) if g.in_order else query[g.q_index].transpose(1, 2)
        if g.first_slot is not None:  # a view, no copy
            k, v = (t.view(1, -1, Hkv, D)[:, g.first_slot : g.first_slot + S] for t in (k_cache, v_cache))
        else:  # whole blocks gathered (a few large copies, not one per key), then the first S keys
            blocks = g.kv_blocks.reshape(-1)
            k, v = (t.index_select(0, blocks).view(G, nb * bs, Hkv, D)[:, :S] for t in (k_cache, v_cache))
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (G, Hkv, S, D)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        # a few queries past a cached prefix (a drafted chain, a short chunk) take the mask: one SDPA call
        # costs less there than the two a maskless long chunk needs
        if g.cached is not None and not sliding_window and not (1 < q.shape[2] <= SHORT_QUERY and g.cached):
            o = _causal(q, k, v, g.cached, scale)
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=g.bias_for(sliding_window, q.dtype), scale=scale, enable_gqa=Hq != Hkv
            )
        if g.in_order:
            return o.squeeze(2)
        o = o.transpose(1, 2).reshape(-1, Hq, D)
        out = query.new_empty(T, Hq, D) if out is None else out
        out[g.token_index] = o[g.valid]
    return out


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: int, scale: float) -> torch.Tensor:
    """One sequence's causal attention, its first `cached` keys seen by every query, without a mask tensor:
    a mask makes SDPA compute every masked score. Past a cached prefix (a prefill chunk) the cached and the
    new keys are attended apart (the new ones causally) and the two merged by their log-sum-exps (CPU)."""
    Q, gqa = q.shape[2], q.shape[1] != k.shape[1]
    if Q == 1 or cached == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=Q > 1, scale=scale, enable_gqa=gqa)
    if gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    old, old_lse = flash(q, k[:, :, :cached], v[:, :, :cached], 0.0, False, scale=scale)
    new, new_lse = flash(q, k[:, :, cached:], v[:, :, cached:], 0.0, True, scale=scale)
    w = torch.sigmoid(old_lse - new_lse).unsqueeze(-1).to(q.dtype)  # exp(a) / (exp(a) + exp(b))
    return new + (old - new) * w
