"""The per-step attention metadata that every attention implementation (reference or Triton) reads."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from branchwise import kernels

NUMPY_INT = {torch.int64: np.int64, torch.int32: np.int32}


@dataclass
class AttentionMetadata:
    """Where a step's new tokens go and what each of them may see.

    Sequence b has new tokens query_start[b]:query_start[b+1] (q_len of them) and, after this step's write,
    seq_lens[b] tokens of K/V; the first seq_lens[b] - q_len are cached and visible to every new token.
    Among the new tokens, mask_offsets[b] == -1 means causal; otherwise custom_mask[off : off + q_len**2]
    is a row-major (q_len, q_len) boolean mask: row i may see new token j. Trees and isolated paths are
    just masks here, never separate code paths.
    """

    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token
    positions: torch.Tensor  # (T,) int64: position ids (sliding windows use them)
    query_start: torch.Tensor  # (B+1,) int32
    seq_lens: torch.Tensor  # (B,) int32
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0
    mask_offsets: torch.Tensor  # (B,) int32, -1: causal
    custom_mask: torch.Tensor  # (M,) bool, concatenated (q_len, q_len) masks
    token_seqs: torch.Tensor  # (T,) int32: the sequence of each new token
    token_index: torch.Tensor  # (T,) int32: 0..T-1
    block_size: int
    max_query_len: int
    max_seq_len: int
    query_start_host: list[int]
    seq_lens_host: list[int]
    mask_offsets_host: list[int]
    graph_splits: int = 0  # > 0: a captured CUDA graph fixed the kernels' tiling (token tiles, this split-K)
    backend: str = ""  # 'triton' or 'reference', as `kernels.backend` chose when the step was built
    # Derived once per step and reused by every layer (e.g. the reference's gather indices and masks).
    cache: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def build_metadata(
    slot_mapping: list[int] | np.ndarray | torch.Tensor,
    positions: list[int] | np.ndarray | torch.Tensor,
    query_lens: list[int] | np.ndarray | None,
    seq_lens: list[int] | np.ndarray,
    block_tables: torch.Tensor,
    masks: list[torch.Tensor | None],
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Pack per-sequence lists into tensors (one host-to-device copy each); block_tables is (B, W) padded.
    Host arrays become tensors without a copy, and on the CPU they are the tensors (every step pays this).
    query_lens None: one token per sequence and no masks (a decode step, known to its packer)."""
    device = torch.device(device)
    cpu = device.type == "cpu"

    def tensor(x, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            t = x.to(dtype)
        else:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=NUMPY_INT[dtype]))
        return t if cpu else t.to(device, non_blocking=True)

    B = len(seq_lens)
    if query_lens is not None:
        query_lens = np.asarray(query_lens, dtype=np.int64)
    if query_lens is None or ((query_lens == 1).all() and all(m is None for m in masks)):  # decode-shaped
        max_query_len = 1
        query_start_host, offsets = list(range(B + 1)), [-1] * B
        query_start, mask_offsets, custom, token_seqs, token_index = _decode_constants(B, device)
    else:
        query_start_np = np.zeros(B + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_np[1:])
        offsets = [-1] * B
        flat, used = [], 0
        for b, mask in enumerate(masks):
            if mask is not None:
                n = int(query_lens[b])
                assert mask.shape == (n, n), f"intra-step mask must be ({n}, {n}), got {tuple(mask.shape)}"
                offsets[b] = used
                flat.append(mask.reshape(-1).to(torch.bool).cpu())
                used += n * n
        custom = torch.cat(flat) if flat else torch.zeros(1, dtype=torch.bool)
        custom = custom if cpu else custom.to(device, non_blocking=True)
        max_query_len = int(query_lens.max(initial=0))
        total = int(query_start_np[-1])
        query_start_host = query_start_np.tolist()
        query_start, mask_offsets = tensor(query_start_np, torch.int32), tensor(offsets, torch.int32)
        token_seqs = tensor(np.repeat(np.arange(B, dtype=np.int32), query_lens), torch.int32)
        token_index = tensor(np.arange(total, dtype=np.int32), torch.int32)
    seq_lens = np.asarray(seq_lens)
    seq_lens_host = seq_lens.tolist()
    return AttentionMetadata(
        slot_mapping=tensor(slot_mapping, torch.int64),
        positions=tensor(positions, torch.int64),
        query_start=query_start,
        seq_lens=tensor(seq_lens, torch.int32),
        block_tables=block_tables.to(device=device, dtype=torch.int32, non_blocking=True),
        mask_offsets=mask_offsets,
        custom_mask=custom,
        token_seqs=token_seqs,
        token_index=token_index,
        block_size=block_size,
        max_query_len=max_query_len,
        max_seq_len=max(seq_lens_host, default=0),
        query_start_host=query_start_host,
        seq_lens_host=seq_lens_host,
        mask_offsets_host=offsets,
        backend=kernels.backend(device),
    )


@functools.lru_cache(maxsize=256)
def _decode_constants(num_seqs: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """query_start, mask_offsets, custom_mask, token_seqs, token_index of a step of one token per sequence
    and no masks: the same every such step (made once; nothing writes into metadata tensors)."""
    seqs = torch.arange(num_seqs, dtype=torch.int32, device=device)
    query_start = torch.arange(num_seqs + 1, dtype=torch.int32, device=device)
    offsets = torch.full((num_seqs,), -1, dtype=torch.int32, device=device)
    return query_start, offsets, torch.zeros(1, dtype=torch.bool, device=device), seqs, seqs
