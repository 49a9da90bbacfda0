"""The per-step attention metadata that every attention implementation (reference or Triton) reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    # Derived once per step and reused by every layer (e.g. the reference's gather indices and masks).
    cache: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def build_metadata(
    slot_mapping: list[int] | torch.Tensor,
    positions: list[int] | torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: torch.Tensor,
    masks: list[torch.Tensor | None],
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Pack per-sequence lists into tensors (one host-to-device copy each); block_tables is (B, W) padded."""
    query_start = [0]
    for n in query_lens:
        query_start.append(query_start[-1] + n)
    offsets, flat, used = [], [], 0
    for n, mask in zip(query_lens, masks, strict=True):
        if mask is None:
            offsets.append(-1)
        else:
            assert mask.shape == (n, n), f"intra-step mask must be ({n}, {n}), got {tuple(mask.shape)}"
            offsets.append(used)
            flat.append(mask.reshape(-1).to(torch.bool).cpu())
            used += n * n
    custom = torch.cat(flat) if flat else torch.zeros(1, dtype=torch.bool)
    token_seqs = torch.repeat_interleave(
        torch.arange(len(query_lens), dtype=torch.int32), torch.tensor(query_lens)
    )
    as_tensor = lambda x, dt: torch.as_tensor(x, dtype=dt).to(device, non_blocking=True)
    return AttentionMetadata(
        slot_mapping=as_tensor(slot_mapping, torch.int64),
        positions=as_tensor(positions, torch.int64),
        query_start=as_tensor(query_start, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32),
        block_tables=block_tables.to(device=device, dtype=torch.int32, non_blocking=True),
        mask_offsets=as_tensor(offsets, torch.int32),
        custom_mask=custom.to(device, non_blocking=True),
        token_seqs=token_seqs.to(device, non_blocking=True),
        token_index=torch.arange(query_start[-1], dtype=torch.int32).to(device, non_blocking=True),
        block_size=block_size,
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_start_host=query_start,
        seq_lens_host=list(seq_lens),
        mask_offsets_host=offsets,
    )
