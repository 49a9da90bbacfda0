"""Every Triton kernel against its PyTorch twin: causal, trees, isolated paths, shared prefixes, splits.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest) on small shapes; on a
GPU (`pytest -m gpu`) natively, at real sizes, in bf16.
"""

from __future__ import annotations

import pytest
import torch

from branchwise.kernels import reference
from branchwise.kernels.metadata import build_metadata

triton_attention = pytest.importorskip("branchwise.kernels.triton_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tree_mask(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def paths_mask(lengths: list[int], shared: int = 1) -> torch.Tensor:
    """`shared` leading tokens seen by all, then isolated causal paths (Multiverse)."""
    n = shared + sum(lengths)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:, :shared] = True
    mask[:shared, :shared] = torch.ones(shared, shared).tril().bool()
    at = shared
    for length in lengths:
        mask[at : at + length, at : at + length] = torch.ones(length, length).tril().bool()
        at += length
    return mask


def make_step(specs, bs, Hkv, D, group, dtype, num_blocks=None, seed=0):
    """Random caches and a step: specs are (cached, q_len, mask or None, share_prefix_with or None)."""
    g = torch.Generator().manual_seed(seed)
    tables, positions, slots, next_block = [], [], [], 0
    for cached, q_len, _, share in specs:
        need = -(-(cached + q_len) // bs)
        if share is None:
            table = list(range(next_block, next_block + need))
            next_block += need
        else:  # the full blocks of another sequence's cached prefix are shared (same physical blocks)
            base = tables[share][: cached // bs]
            table = base + list(range(next_block, next_block + need - len(base)))
            next_block += need - len(base)
        tables.append(table)
        slots += [table[i // bs] * bs + i % bs for i in range(cached, cached + q_len)]
        positions += list(range(cached, cached + q_len))
    num_blocks = num_blocks or next_block + 1
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    width = max(len(t) for t in tables)
    padded = torch.zeros(len(tables), width, dtype=torch.int32)
    for b, t in enumerate(tables):
        padded[b, : len(t)] = torch.tensor(t)
    q_lens = [s[1] for s in specs]
    meta = build_metadata(
        slots, positions, q_lens, [s[0] + s[1] for s in specs], padded, [s[2] for s in specs], bs, DEVICE
    )
    T = sum(q_lens)
    q = torch.randn(T, Hkv * group, D, generator=g).to(dtype)
    k = torch.randn(T, Hkv, D, generator=g).to(dtype)
    v = torch.randn(T, Hkv, D, generator=g).to(dtype)
    return [x.to(DEVICE) for x in (q, k, v, k_cache, v_cache)] + [meta]


def check(specs, group, D, Hkv=2, bs=16, window=None, graph_splits=0, dtype=torch.float32, tol=2e-4):
    q, k, v, kc, vc, meta = make_step(specs, bs, Hkv, D, group, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.store_kv(k, v, kc_ref, vc_ref, meta.slot_mapping)
    triton_attention.store_kv(k, v, kc, vc, meta.slot_mapping)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    ref = reference.paged_attention(q.float(), kc_ref.float(), vc_ref.float(), meta, D**-0.5, window)
    meta.cache.clear()
    meta.graph_splits = graph_splits
    out = triton_attention.paged_attention(q, kc, vc, meta, D**-0.5, window)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.2e}"


DECODE_MIX = [
    (16, 1, None, None),  # decode exactly at a block boundary
    (15, 1, None, None),  # decode filling a block's last slot
    (37, 4, None, None),  # a drafted chain, causal
    (21, 6, tree_mask([-1, 0, 0, 1, 2, 3]), None),  # a token tree
    (32, 7, paths_mask([3, 3]), 0),  # isolated paths over a prefix shared with sequence 0
    (0, 3, None, None),  # a fresh short prompt
]
PREFILL_MIX = [
    (5, 40, None, None),  # a long prefill chunk over a short cached prefix
    (16, 1, None, 0),
    (9, 33, paths_mask([10, 12, 10]), None),  # a long path-isolated prefill
    (48, 20, None, None),
]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_token_tiles_match_reference(group, D):
    check(DECODE_MIX, group, D)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("D", [64, 128])
def test_prefill_tiles_match_reference(group, D):
    check(PREFILL_MIX, group, D)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_k_over_long_contexts_matches_reference(splits):
    specs = [(300, 1, None, None), (129, 3, None, None), (64, 1, None, 0), (0, 1, None, None)]
    check(specs, group=4, D=64, graph_splits=splits)


def test_sliding_window_matches_reference():
    check([(90, 1, None, None), (70, 5, None, None)], group=2, D=64, window=24)
    check(PREFILL_MIX, group=2, D=64, window=24)


def test_padding_tokens_write_nothing_and_read_nothing():
    q, k, v, kc, vc, meta = make_step([(10, 2, None, None)], 16, 2, 64, 1, torch.float32)
    before = kc.clone()
    meta.slot_mapping[1] = -1
    triton_attention.store_kv(k, v, kc, vc, meta.slot_mapping)
    assert torch.equal(kc[0, 11], before[0, 11]) and not torch.equal(kc[0, 10], before[0, 10])


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_kernels_at_real_sizes_in_bf16(group, D):
    decode = [(int(torch.randint(1, 4000, ())), 1, None, None) for _ in range(48)]
    decode += [
        (2000, 8, tree_mask([-1, 0, 0, 1, 1, 2, 2, 3]), None),
        (1500, 5, None, 0),
        (777, 12, paths_mask([5, 6]), 1),
    ]
    check(decode, group, D, Hkv=8, dtype=torch.bfloat16, tol=1e-2)
    prefill = [
        (0, 1024, None, None),
        (512, 700, None, None),
        (3000, 1, None, 0),
        (100, 300, paths_mask([100, 99, 100]), None),
    ]
    check(prefill, group, D, Hkv=8, dtype=torch.bfloat16, tol=1e-2)


triton_linear = pytest.importorskip("branchwise.kernels.triton_linear")


@pytest.mark.parametrize(
    ("M", "N", "K", "bias", "config"),
    [
        (1, 70, 100, True, (32, 32, 1)),  # N and K off the tile grid
        (3, 64, 300, False, (16, 64, 3)),  # K split three ways, the last split short
        (16, 33, 257, True, (64, 128, 2)),  # a full row tile, bias added after the split sum
        (5, 200, 64, True, (128, 16, 4)),
    ],
)
def test_skinny_linear_matches_reference(M, N, K, bias, config):
    g = torch.Generator().manual_seed(M * N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    x, w, b = (t.to(DEVICE) if t is not None else None for t in (x, w, b))
    got = triton_linear.skinny_linear(x, w, b, *config)
    want = reference.skinny_linear(x, w, b, *config)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4
    # a row-strided input (a slice of a wider activation) gives the same rows
    wide = torch.cat([x, torch.randn(M, 7, generator=g).to(DEVICE)], 1)[:, :K]
    assert torch.equal(triton_linear.skinny_linear(wide, w, b, *config), got)


def test_split_k_sums_are_the_same_every_run():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 512, generator=g).to(DEVICE), torch.randn(48, 512, generator=g).to(DEVICE)
    runs = [triton_linear.skinny_linear(x, w, None, 16, 32, 8) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)])
def test_skinny_linear_at_real_sizes_in_bf16(shape):
    N, K = shape
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M in (1, 2, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        want = torch.nn.functional.linear(x.float(), w.float(), b.float())
        for block_n, block_k, warps, stages in triton_linear.CANDIDATES:
            splits = triton_linear.splits_for(N, K, block_n, block_k, sms)
            got = triton_linear.skinny_linear(x, w, b, block_n, block_k, splits, warps, stages)
            assert (got.float() - want).abs().max() < 0.05, (M, block_n, block_k, splits)


@pytest.mark.gpu
def test_tuning_keeps_skinny_configs_that_compute_the_same_product():
    weights = [
        torch.randn(n, 1536, device="cuda", dtype=torch.bfloat16) / 40 for n in (256, 8960) for _ in range(8)
    ]
    chosen = triton_linear.tune(weights)
    assert set(chosen) <= {(256, 1536, torch.bfloat16), (8960, 1536, torch.bfloat16)}
    for (n, k, dtype), config in chosen.items():
        w = next(w for w in weights if w.shape[0] == n)
        x = torch.randn(2, k, device="cuda", dtype=dtype)
        assert (
            triton_linear.skinny_linear(x, w, None, *config).float() - (x @ w.T).float()
        ).abs().max() < 0.05


@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("cached, q_len", [(0, 40), (37, 40), (70, 1), (0, 1), (16, 33)])
def test_one_sequence_without_a_mask_tensor_equals_dense_causal_attention(cached, q_len, scattered):
    """The reference's maskless path for one plain-causal sequence (a view of consecutive blocks, or a
    gather of scattered ones; chunks past a cached prefix merged by log-sum-exp) against dense attention."""
    bs, Hkv, group, D = 16, 2, 2, 32
    g = torch.Generator().manual_seed(cached + q_len)
    need = -(-(cached + q_len) // bs)
    table = list(range(need))[::-1] if scattered and need > 1 else list(range(need))
    kc, vc = (torch.randn(need + 1, bs, Hkv, D, generator=g) for _ in range(2))
    slots = [table[i // bs] * bs + i % bs for i in range(cached, cached + q_len)]
    meta = build_metadata(
        slots, list(range(cached, cached + q_len)), [q_len], [cached + q_len],
        torch.tensor([table], dtype=torch.int32), [None], bs, "cpu",
    )  # fmt: skip
    q = torch.randn(q_len, Hkv * group, D, generator=g)
    k, v = torch.randn(q_len, Hkv, D, generator=g), torch.randn(q_len, Hkv, D, generator=g)
    reference.store_kv(k, v, kc, vc, meta.slot_mapping)
    out = reference.paged_attention(q, kc, vc, meta, D**-0.5)
    all_slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(cached + q_len)])
    keys = kc.view(-1, Hkv, D)[all_slots].repeat_interleave(group, 1)  # (S, Hq, D)
    values = vc.view(-1, Hkv, D)[all_slots].repeat_interleave(group, 1)
    scores = torch.einsum("qhd,shd->hqs", q, keys) * D**-0.5
    visible = torch.arange(cached + q_len)[None, :] <= torch.arange(cached, cached + q_len)[:, None]
    want = torch.einsum("hqs,shd->qhd", scores.masked_fill(~visible, -torch.inf).softmax(-1), values)
    assert torch.allclose(out, want, atol=1e-5), (out - want).abs().max()
