"""Masks are data: trees and isolated paths through the reference attention and the real model."""

from __future__ import annotations

import pytest
import torch

from branchwise import LLM, SamplingParams
from branchwise.kernels import reference
from branchwise.kernels.metadata import build_metadata
from branchwise.strategies.base import Plan


def dense_attention(q, keys, values, visible, scale):
    """float64 attention of q (n, Hq, D) over keys (S, Hkv, D) with visible (n, S)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("group", [1, 4])
def test_reference_attention_with_causal_tree_shared_prefix_and_decode_tokens(group):
    torch.manual_seed(0)
    bs, Hkv, D = 4, 2, 8
    Hq = Hkv * group
    k_cache = torch.randn(19, bs, Hkv, D)
    v_cache = torch.randn(19, bs, Hkv, D)
    # seq 0: 9 cached + 3 new, causal; seq 1 shares seq 0's first two blocks, 5 new tokens as a tree;
    # seq 2: 2 cached + 40 new (a long prefill chunk, attended on its own); seqs 3 and 4: one new token
    # each (decoding beside the drafts: attended apart from them)
    tables = [[3, 7, 1], [3, 7, 9, 2], [4, 5, 6, 8, 10, 11, 12, 13, 14, 15, 0], [16, 17], [18]]
    cached = [9, 8, 2, 6, 0]
    q_lens = [3, 5, 40, 1, 1]
    tree = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
        dtype=torch.bool,
    )
    masks = [None, tree, None, None, None]
    slots, positions = [], []
    for table, c, n in zip(tables, cached, q_lens, strict=True):
        slots += [table[i // bs] * bs + i % bs for i in range(c, c + n)]
        positions += list(range(c, c + n))
    T = sum(q_lens)
    padded = torch.zeros(5, 11, dtype=torch.long)
    for b, t in enumerate(tables):
        padded[b, : len(t)] = torch.tensor(t)
    meta = build_metadata(
        slots,
        positions,
        q_lens,
        [c + n for c, n in zip(cached, q_lens, strict=True)],
        padded,
        masks,
        bs,
        "cpu",
    )
    q, k_new, v_new = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    reference.store_kv(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    out = reference.paged_attention(q, k_cache, v_cache, meta, 0.3)
    start = 0
    for table, c, n, mask in zip(tables, cached, q_lens, masks, strict=True):
        idx = torch.tensor([table[i // bs] * bs + i % bs for i in range(c + n)])
        keys, values = k_cache.view(-1, Hkv, D)[idx], v_cache.view(-1, Hkv, D)[idx]
        intra = torch.ones(n, n, dtype=torch.bool).tril() if mask is None else mask
        visible = torch.cat([torch.ones(n, c, dtype=torch.bool), intra], 1)
        ref = dense_attention(q[start : start + n], keys, values, visible, 0.3)
        assert torch.allclose(out[start : start + n].double(), ref, atol=1e-5)
        start += n


def test_tree_nodes_score_like_causal_decoding_of_their_paths(tiny_qwen2, prompts):
    """The tree check: each node's logits equal an ordinary causal forward over prefix + its path."""
    llm = LLM(tiny_qwen2, dtype="float32")
    engine = llm.engine
    prefix = prompts[4]
    engine.add_request("p", prefix, SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    seq_prefix = prefix + [7]  # continue after the prefix with a root token
    # tree over the root: nodes a, b at depth 1; c under a, d under b, e under c
    parent = [-1, 0, 0, 1, 2, 3]  # index 0 is the root
    tokens = [7, 11, 22, 33, 44, 55]
    depth = [0, 1, 1, 2, 2, 3]
    mask = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    from branchwise.engine.sequence import Sequence

    seq = Sequence(99, "t", 0, list(seq_prefix), len(seq_prefix), SamplingParams(), "ar", torch.Generator())
    engine.blocks.allocate(seq, len(prefix))
    engine.runner.forward([Plan(seq, prefix, num_logits=0)])
    seq.num_computed = len(prefix)
    engine.blocks.allocate(seq, len(prefix) + 6)
    plan = Plan(seq, tokens, num_logits=6, positions=[len(prefix) + d for d in depth], mask=mask)
    tree_logits = engine.runner.forward([plan]).logits
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    for node in range(6):
        path, j = [], node
        while j >= 0:
            path.insert(0, tokens[j])
            j = parent[j]
        ref = model(torch.tensor([prefix + path])).logits[0, -1]
        assert torch.allclose(tree_logits[node], ref, atol=1e-4), node
    engine.blocks.free(seq)
    assert engine.blocks.num_available == engine.num_blocks


def test_isolated_paths_in_one_sequence_equal_separate_sequences(tiny_llama, prompts):
    """Path isolation (Multiverse): two paths fed side by side at the same positions, masked from each
    other, score exactly like two separate sequences over the shared prefix."""
    llm = LLM(tiny_llama)
    engine = llm.engine
    prefix, a, b = prompts[2], [5, 6, 7], [8, 9]
    from branchwise.engine.sequence import Sequence

    seq = Sequence(1, "x", 0, list(prefix), len(prefix), SamplingParams(), "ar", torch.Generator())
    engine.blocks.allocate(seq, len(prefix) + 5)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[:3, :3] = torch.ones(3, 3).tril().bool()
    mask[3:, 3:] = torch.ones(2, 2).tril().bool()
    n = len(prefix)
    plans = [
        Plan(
            seq,
            prefix + a + b,
            num_logits=5,
            positions=list(range(n)) + [n, n + 1, n + 2, n, n + 1],
            mask=torch.cat(
                [
                    torch.cat([torch.ones(n, n).tril().bool(), torch.zeros(n, 5, dtype=torch.bool)], 1),
                    torch.cat([torch.ones(5, n, dtype=torch.bool), mask], 1),
                ]
            ),
        )
    ]
    joint = engine.runner.forward(plans).logits
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ref_a = model(torch.tensor([prefix + a])).logits[0, -3:]
    ref_b = model(torch.tensor([prefix + b])).logits[0, -2:]
    assert torch.allclose(joint[:3], ref_a, atol=1e-4)
    assert torch.allclose(joint[3:], ref_b, atol=1e-4)
    engine.blocks.free(seq)


def test_a_decode_steps_short_path_packs_what_the_general_path_packs():
    """`pack` and `build_metadata` take a short path when every plan feeds one token (no query lengths are
    checked there); a plan with explicit positions takes the general one. Both give the same arrays."""
    import dataclasses

    import numpy as np

    from branchwise.engine.model_runner import pack, to_device
    from branchwise.engine.sequence import Sequence

    bs, cpu = 4, torch.device("cpu")
    seqs = []
    for b, (length, table) in enumerate([(5, [3, 7]), (9, [1, 2, 8]), (2, [5]), (12, [4, 6, 9])]):
        seq = Sequence(b, str(b), 0, list(range(10, 10 + length)), 1, SamplingParams(), "ar", None)
        seq.num_computed, seq.block_table = length - 1, table
        seqs.append(seq)
    short = pack([Plan(s, s.token_ids[-1:]) for s in seqs], bs)
    general = pack([Plan(s, s.token_ids[-1:], positions=[s.num_computed]) for s in seqs], bs)
    assert short.decode and not general.decode
    for f in dataclasses.fields(short):
        if f.name not in ("masks", "decode"):
            assert np.array_equal(getattr(short, f.name), getattr(general, f.name)), f.name
    (ids_short, meta_short), (ids_general, meta_general) = (
        to_device(short, bs, cpu),
        to_device(general, bs, cpu),
    )
    assert torch.equal(ids_short, ids_general)
    assert meta_short.max_query_len == 1 and meta_short.query_start_host == [0, 1, 2, 3, 4]
    assert meta_short.seq_lens_host == [5, 9, 2, 12] and meta_short.max_seq_len == 12
    assert meta_short.slot_mapping.tolist() == [
        7 * 4 + 0,
        8 * 4 + 0,
        5 * 4 + 1,
        9 * 4 + 3,
    ]  # block * bs + offset
    for f in dataclasses.fields(meta_short):
        a, b = getattr(meta_short, f.name), getattr(meta_general, f.name)
        assert torch.equal(a, b.to(a.dtype)) if isinstance(a, torch.Tensor) else a == b, f.name
