"""Skinny GEMM for decode-shaped steps: y = x @ W.T + b, x of <= 16 rows (twin: `reference.skinny_linear`).

At batch 1 a decode step reads every weight once and does almost no arithmetic, so a GEMM is as fast as it
streams W. cuBLAS tiles a 2-row product like a big one and reads W at about half the bandwidth on an H100.
Here a program owns BLOCK_N output columns for all (<= 16) rows, streams its W tile along K once, and
long-K / few-column shapes split K among programs (a second kernel sums the splits in a fixed order, so
results do not depend on timing). Which shapes use it is measured, not assumed: `tune` times each weight
shape of the model against cuBLAS on the device at start-up and keeps a config only where it wins.
"""

from __future__ import annotations

import logging
import statistics

import torch
import triton
import triton.language as tl

from branchwise.kernels import SKINNY_MAX_ROWS

log = logging.getLogger(__name__)

CANDIDATES = (  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (16, 256, 4, 4),
    (32, 128, 4, 4),
    (32, 256, 4, 3),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
    (128, 128, 8, 3),
)


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    x_stride,
    w_stride,
    k_per_split,
    HAS_BIAS: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k in range(k_start, k_end, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        in_k = ks < k_end
        x = tl.load(
            x_ptr + rows[:, None] * x_stride + ks[None, :],
            mask=(rows[:, None] < M) & in_k[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[:, None] * w_stride + ks[None, :],
            mask=(cols[:, None] < N) & in_k[None, :],
            other=0.0,
        )
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if DIRECT:  # one split: bias and the output dtype here
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < N).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # partial sums (splits, M, N) in fp32
        tl.store(out_ptr + (split * M + rows[:, None]) * N + cols[None, :], acc, mask=mask)


@triton.jit
def _sum_splits_kernel(
    part_ptr, b_ptr, out_ptr, M, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):  # a fixed order: the same sum every run
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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
    """(M, K) x (N, K) weight (+ (N,) bias) -> (M, N) in x's dtype, M <= 16, K split `splits` ways."""
    x = x if x.stride(1) == 1 else x.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    assert M <= SKINNY_MAX_ROWS and weight.shape[1] == K and weight.stride(1) == 1
    out = x.new_empty(M, N)
    if M == 0:
        return out
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    direct = splits == 1
    target = out if direct else torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    _skinny_linear_kernel[(triton.cdiv(N, block_n), splits)](
        x,
        weight,
        bias if bias is not None else weight,
        target,
        M,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        k_per_split,
        HAS_BIAS=bias is not None,
        DIRECT=direct,
        BLOCK_M=SKINNY_MAX_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 stays exact; no-op for bf16
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not direct:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](
            target,
            bias if bias is not None else target,
            out,
            M,
            N,
            SPLITS=splits,
            HAS_BIAS=bias is not None,
            BLOCK=block,
        )
    return out


@torch.library.custom_op("branchwise::skinny_linear", mutates_args=())
def skinny_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block_n: int,
    block_k: int,
    splits: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    """`skinny_linear` as one opaque op for torch.compile and CUDA graphs."""
    return skinny_linear(x, weight, bias, block_n, block_k, splits, num_warps, num_stages)


@skinny_linear_op.register_fake
def _(x, weight, bias, *args):
    return x.new_empty(x.shape[0], weight.shape[0])


def splits_for(n: int, k: int, block_n: int, block_k: int, num_sms: int) -> int:
    """Split K until the grid covers the device about twice, keeping >= 2 K tiles per program."""
    programs = triton.cdiv(n, block_n)
    splits = 1
    while programs * splits < 2 * num_sms and k // (splits * 2) >= 2 * block_k:
        splits *= 2
    return splits


def _time_ms(fn, weights: list[torch.Tensor], rounds: int = 5) -> float:
    """Median over rounds of one pass over every weight of the shape (together larger than L2)."""
    fn(weights[0])
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for w in weights:
            fn(w)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(weights))
    return statistics.median(times)


def tune(weights: list[torch.Tensor], rows: tuple[int, ...] = (2, 16)) -> dict[tuple, tuple]:
    """{(N, K, dtype): config} for the weight shapes where the skinny GEMM beats cuBLAS at every row count."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for w in weights:
        by_shape.setdefault((w.shape[0], w.shape[1], w.dtype), []).append(w)
    num_sms = torch.cuda.get_device_properties(weights[0].device).multi_processor_count
    chosen = {}
    for (n, k, dtype), ws in by_shape.items():
        xs = [torch.randn(m, k, dtype=dtype, device=ws[0].device) for m in rows]
        cublas = sum(_time_ms(lambda w, x=x: torch.nn.functional.linear(x, w), ws) for x in xs)
        best, best_ms = None, cublas
        for block_n, block_k, warps, stages in CANDIDATES:
            config = (block_n, block_k, splits_for(n, k, block_n, block_k, num_sms), warps, stages)
            try:
                ms = sum(_time_ms(lambda w, x=x, c=config: skinny_linear(x, w, None, *c), ws) for x in xs)
            except Exception as e:  # a config this device or compiler refuses: cuBLAS stays
                log.debug("skinny GEMM config %s failed for %s: %s", config, (n, k), e)
                continue
            if ms < best_ms:
                best, best_ms = config, ms
        log.info(
            "GEMM %dx%d %s: %s (%.1f us vs cuBLAS %.1f us at %s rows)",
            n,
            k,
            str(dtype).removeprefix("torch."),
            f"skinny {best}" if best else "cuBLAS",
            best_ms * 1e3,
            cublas * 1e3,
            "+".join(map(str, rows)),
        )
        if best is not None:
            chosen[(n, k, dtype)] = best
    return chosen
