"""PyTorch references of the kernels: exact, any device, and the twins the Triton kernels match."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


@dataclass
class _Group:
    """Sequences whose queries are padded to one (G, Q) batch, with keys gathered to (G, S)."""

    q_index: torch.Tensor  # (G, Q) token index of each padded query
    kv_slots: torch.Tensor  # (G, S) cache slot of each key
    valid: torch.Tensor  # (n,) flat indices into G*Q of real queries, in token order
    token_index: torch.Tensor  # (n,) their token indices
    mask: torch.Tensor  # (G, 1, Q, S) bool: query may see key
    query_pos: torch.Tensor  # (G, Q, 1)
    key_pos: torch.Tensor  # (G, 1, S)
    windowed: dict = field(default_factory=dict)  # additive masks by (sliding window, dtype)
    cached: int | None = None  # one sequence, plain causal: its keys before this step's (no mask needed)
    first_slot: int | None = None  # ... and its keys lie in consecutive slots from here (no gather needed)

    def bias_for(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (0 / -inf; SDPA is faster with it than with booleans), built once per step."""
        key = (sliding_window or 0, dtype)
        if key not in self.windowed:
            mask = self.mask
            if sliding_window:
                # real rows always keep their own key; padded rows may go empty (NaN), and are discarded
                mask = mask & ((self.query_pos - self.key_pos) < sliding_window)[:, None]
            self.windowed[key] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, float("-inf")
            )
        return self.windowed[key]


def _group(meta: AttentionMetadata, seqs: list[int], device: torch.device) -> _Group:
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
    kv_slots = tables[:, (j // bs).clamp(max=tables.shape[1] - 1)] * bs + j % bs  # (G, S)

    num_cached, first_slot = None, None
    if G == 1 and offs[seqs[0]] < 0 and device.type == "cpu":  # (a host read: CPU only)
        num_cached = int(S - Q)
        used = tables[0, : -(-S // bs)]
        if bool((used.diff() == 1).all()):
            first_slot = int(used[0]) * bs
    if Q == 1:  # decode: each query sees all of its sequence's keys, itself last
        mask = (j[None, :] < seq_len)[:, None, None]  # (G, 1, 1, S)
        key_pos = j[None, None, :].expand(G, 1, S)
        return _Group(
            q_index=q_index,
            kv_slots=kv_slots,
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
        kv_slots=kv_slots,
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
        short = [b for b in range(meta.num_seqs) if qs[b + 1] - qs[b] <= SHORT_QUERY]
        long = [b for b in range(meta.num_seqs) if qs[b + 1] - qs[b] > SHORT_QUERY]
        meta.cache["reference"] = [
            _group(meta, seqs, device) for seqs in ([short] if short else []) + [[b] for b in long]
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
    keys = k_cache.view(-1, Hkv * D)  # (slots, Hkv * D)
    values = v_cache.view(-1, Hkv * D)
    out = query.new_empty(T, Hq, D)
    for g in _groups(meta, query.device):
        G, S = g.kv_slots.shape
        q = query[g.q_index].transpose(1, 2)  # (G, Hq, Q, D)
        if g.first_slot is not None:  # a view, no copy
            k, v = (t[g.first_slot : g.first_slot + S] for t in (keys, values))
        else:
            slots = g.kv_slots.view(-1)
            k, v = keys.index_select(0, slots), values.index_select(0, slots)
        k = k.view(G, S, Hkv, D).transpose(1, 2).to(q.dtype)  # (G, Hkv, S, D)
        v = v.view(G, S, Hkv, D).transpose(1, 2).to(q.dtype)
        if g.cached is not None and not sliding_window:
            o = _causal(q, k, v, g.cached, scale)
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=g.bias_for(sliding_window, q.dtype), scale=scale, enable_gqa=Hq != Hkv
            )
        out[g.token_index] = o.transpose(1, 2).reshape(-1, Hq, D)[g.valid]
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
