"""Triton kernels: KV store and paged attention with masks as data; twins of `reference.py`.

One attention kernel serves every step. A program handles a tile of query tokens of one sequence for one KV
head; its rows are (query token, query head of that KV head's group), so each K/V tile is loaded once for
the whole GQA group. Two tilings:

- token tiles (decode, drafted chains, trees: few new tokens per sequence): one query token per program,
  the grid is (T, kv_heads, splits) and depends only on the token count, so a CUDA graph captured for T
  tokens replays for any mix of sequences. Split-K divides long contexts among `splits` programs whose
  partial softmax states a second kernel merges.
- prefill tiles (long chunks): BLOCK_Q query tokens per program, no split.

Visibility of key j for new token i of a sequence with `cached` tokens before this step: j < cached always;
a new key (j - cached = jn) per the sequence's mask (causal: jn <= i; custom: the mask bit); sliding windows
compare positions. Padded tokens (slot -1, sequence length 0) write nothing and produce zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from branchwise.kernels.metadata import AttentionMetadata

DECODE_MAX_QUERY = 16  # sequences with at most this many new tokens use token tiles
BLOCK_N = 64


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    k_st,
    k_sh,
    v_st,
    v_sh,
    c_ss,
    c_sh,
    H: tl.constexpr,
    D: tl.constexpr,
    H_P: tl.constexpr,
    D_P: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, H_P)[:, None]
    d = tl.arange(0, D_P)[None, :]
    m = (h < H) & (d < D) & (h * 0 + slot >= 0)  # (a scalar condition is broadcast: interpreter quirk)
    k = tl.load(k_ptr + t * k_st + h * k_sh + d, mask=m)
    tl.store(kc_ptr + slot * c_ss + h * c_sh + d, k.to(kc_ptr.dtype.element_ty), mask=m)
    v = tl.load(v_ptr + t * v_st + h * v_sh + d, mask=m)
    tl.store(vc_ptr + slot * c_ss + h * c_sh + d, v.to(vc_ptr.dtype.element_ty), mask=m)


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write each new token's K/V (T, Hkv, D) into its slot; slot -1 (padding) writes nothing."""
    T, H, D = key.shape
    assert key.stride(2) == 1 and value.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if T == 0:
        return
    _store_kv_kernel[(T,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        H * D,
        D,
        H=H,
        D=D,
        H_P=triton.next_power_of_2(H),
        D_P=triton.next_power_of_2(D),
    )


@triton.jit
def _attention_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    tile_seq_ptr,
    tile_q0_ptr,
    query_start_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    mask_offsets_ptr,
    custom_mask_ptr,
    positions_ptr,
    scale_log2,
    q_st,
    q_sh,
    o_st,
    o_sh,
    c_ss,
    c_sh,
    bt_stride,
    num_heads,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    D_P: tl.constexpr,
    BS: tl.constexpr,
    WINDOW: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    t0 = tl.load(tile_q0_ptr + tile)
    qs = tl.load(query_start_ptr + seq)
    qe = tl.load(query_start_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_len = qe - qs
    cached = seq_len - q_len
    moff = tl.load(mask_offsets_ptr + seq)

    r = tl.arange(0, BLOCK_M)
    has_mask = (r * 0 + moff) >= 0  # per row: this sequence carries a custom mask
    tok = t0 + r // GROUP
    head = kvh * GROUP + r % GROUP
    row_ok = (r < BLOCK_Q * GROUP) & (tok < qe)
    i_new = tok - qs
    d = tl.arange(0, D_P)
    d_ok = d < D
    q = tl.load(
        q_ptr + tok[:, None] * q_st + head[:, None] * q_sh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = tl.load(positions_ptr + tok, mask=row_ok, other=0)

    # keys this tile can see: [start, kv_end), split evenly (in BLOCK_N steps) among the splits
    last_new = tl.minimum(t0 + BLOCK_Q, qe) - 1 - qs
    kv_end = tl.where(moff < 0, cached + last_new + 1, seq_len)
    kv_end = tl.maximum(kv_end, 0)
    start = 0
    if WINDOW > 0:
        first_pos = tl.min(tl.where(row_ok, q_pos, 2147483647), 0)
        start = tl.maximum(tl.minimum(first_pos - WINDOW + 1, cached), 0) // BLOCK_N * BLOCK_N
    n_tiles = tl.cdiv(kv_end - start, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    lo = start + split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, kv_end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    for kv0 in range(lo, hi, BLOCK_N):
        j = kv0 + tl.arange(0, BLOCK_N)
        k_ok = j < hi
        block = tl.load(block_tables_ptr + seq * bt_stride + j // BS, mask=k_ok, other=0).to(tl.int64)
        slot = block * BS + j % BS
        kv_off = slot[:, None] * c_ss + kvh * c_sh + d[None, :]
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2  # (M, N)
        jn = j - cached
        is_new = (jn >= 0)[None, :]
        visible = row_ok[:, None] & k_ok[None, :]
        causal = jn[None, :] <= i_new[:, None]
        custom = (
            tl.load(
                custom_mask_ptr + moff + i_new[:, None] * q_len + jn[None, :],
                mask=visible & is_new & has_mask[:, None],
                other=0,
            )
            != 0
        )
        visible = visible & (~is_new | tl.where(has_mask[:, None], custom, causal))
        if WINDOW > 0:
            k_pos = tl.where(jn >= 0, tl.load(positions_ptr + qs + jn, mask=(jn >= 0) & k_ok, other=0), j)
            visible = visible & ((q_pos[:, None] - k_pos[None, :]) < WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new

    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + tok[:, None] * o_st + head[:, None] * o_sh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        part = (tok * num_heads + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * D_P + d[None, :], acc, mask=out_mask)
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    o_st,
    o_sh,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    S_P: tl.constexpr,
    D: tl.constexpr,
    D_P: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_P)
    s_ok = s < NUM_SPLITS
    part = (t * num_heads + h) * NUM_SPLITS + s
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(s_ok & (m > float("-inf")), tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)), 0.0)
    total = tl.sum(w * l_s, 0)
    d = tl.arange(0, D_P)
    acc = tl.load(
        part_acc_ptr + part[:, None] * D_P + d[None, :], mask=s_ok[:, None] & (d < D)[None, :], other=0.0
    )
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + t * o_st + h * o_sh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _tiling(meta: AttentionMetadata, group: int, kv_heads: int, device: torch.device):
    """(tile_seq, tile_q0, BLOCK_Q, splits) for this step, built once and shared by every layer."""
    key = ("triton", group)
    if key in meta.cache:
        return meta.cache[key]
    T = meta.token_seqs.shape[0]
    if meta.graph_splits or meta.max_query_len <= DECODE_MAX_QUERY:
        splits = meta.graph_splits or _auto_splits(T * kv_heads, meta.max_seq_len, device)
        tiles = (meta.token_seqs, meta.token_index, 1, splits)
    else:
        block_q = max(1, 64 // group)
        qs = meta.query_start_host
        seqs, firsts = [], []
        for b in range(meta.num_seqs):
            for q0 in range(qs[b], qs[b + 1], block_q):
                seqs.append(b)
                firsts.append(q0)
        as_dev = lambda x: torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)
        tiles = (as_dev(seqs), as_dev(firsts), block_q, 1)
    meta.cache[key] = tiles
    return tiles


def _auto_splits(programs: int, max_seq_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU, but no split shorter than 4 key tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    by_load = triton.cdiv(2 * sms, max(programs, 1))
    by_length = max(1, max_seq_len // (4 * BLOCK_N))
    return triton.next_power_of_2(max(1, min(by_load, by_length, 16)))


def paged_attention(query, k_cache, v_cache, meta: AttentionMetadata, scale: float, sliding_window=None):
    """Attention of new tokens (T, Hq, D) over their sequences' cached + new K/V; returns (T, Hq, D)."""
    tile_seq, tile_q0, block_q, splits = _tiling(
        meta, query.shape[1] // k_cache.shape[2], k_cache.shape[2], query.device
    )
    return _attend(
        query,
        k_cache,
        v_cache,
        tile_seq,
        tile_q0,
        meta.query_start,
        meta.seq_lens,
        meta.block_tables,
        meta.mask_offsets,
        meta.custom_mask,
        meta.positions,
        scale,
        sliding_window or 0,
        block_q,
        splits,
        meta.block_size,
    )


def _attend(
    query,
    k_cache,
    v_cache,
    tile_seq,
    tile_q0,
    query_start,
    seq_lens,
    block_tables,
    mask_offsets,
    custom_mask,
    positions,
    scale: float,
    window: int,
    block_q: int,
    splits: int,
    block_size: int,
):
    T, Hq, D = query.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty(T, Hq, D, dtype=query.dtype, device=query.device)
    if T == 0:
        return out
    D_P = triton.next_power_of_2(D)
    if splits > 1:
        part_acc = torch.empty(T * Hq * splits, D_P, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(T * Hq * splits, 2, dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = out
    block_m = max(16, triton.next_power_of_2(block_q * group))
    _attention_kernel[(tile_seq.shape[0], Hkv, splits)](
        query,
        k_cache,
        v_cache,
        out,
        part_acc,
        part_ml,
        tile_seq,
        tile_q0,
        query_start,
        seq_lens,
        block_tables,
        mask_offsets,
        custom_mask.view(torch.uint8),
        positions,
        scale * 1.4426950408889634,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        Hkv * D,
        D,
        block_tables.stride(0),
        Hq,
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        D=D,
        D_P=D_P,
        BS=block_size,
        WINDOW=window,
        NUM_SPLITS=splits,
        PRECISION="ieee"
        if query.dtype == torch.float32
        else "tf32",  # fp32 stays exact; tf32 is a no-op for bf16
    )
    if splits > 1:
        _merge_splits_kernel[(T, Hq)](
            part_acc,
            part_ml,
            out,
            out.stride(0),
            out.stride(1),
            Hq,
            NUM_SPLITS=splits,
            S_P=max(2, triton.next_power_of_2(splits)),
            D=D,
            D_P=D_P,
        )
    return out


# Under CUDA graphs the decoder is compiled (torch.compile fuses HF's many small elementwise kernels) and
# attention is this one opaque op. It writes the step's K/V into `kv` without declaring the mutation:
# declaring it would make the compiler functionalise (copy) the whole cache. That is safe because only
# this layer's op, later in the same call, reads the slots it writes.
@torch.library.custom_op("branchwise::token_tile_attention", mutates_args=())
def token_tile_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv: torch.Tensor,
    layer: int,
    slot_mapping: torch.Tensor,
    token_seqs: torch.Tensor,
    token_index: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    mask_offsets: torch.Tensor,
    custom_mask: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    window: int,
    splits: int,
    block_size: int,
) -> torch.Tensor:
    """Store the step's K/V of one layer and attend, in token tiles with a fixed split-K (graph mode)."""
    store_kv(key, value, kv[layer, 0], kv[layer, 1], slot_mapping)
    return _attend(
        query,
        kv[layer, 0],
        kv[layer, 1],
        token_seqs,
        token_index,
        query_start,
        seq_lens,
        block_tables,
        mask_offsets,
        custom_mask,
        positions,
        scale,
        window,
        1,
        splits,
        block_size,
    )


@token_tile_attention.register_fake
def _(query, key, value, kv, layer, *args):
    return query.new_empty(query.shape)
