"""GLM-mask flash attention in Triton: query ``i`` attends to keys ``attn_lo[i] <= j < attn_hi[i]``.

FlashAttention-2's tiling and online softmax, with GLM's interval mask read
from the two bound vectors instead of an ``[S, S]`` mask. For each query tile the kernel
takes the union ``[min lo, max hi)`` and the intersection ``[max lo, min hi)`` of its rows'
intervals: key tiles outside the union are never visited, tiles inside the intersection
are computed without any masking, and only the few tiles on an interval edge compare
indices. The backward pass recomputes the probabilities from the saved log-sum-exp: one
kernel walks key tiles (dK, dV), one walks query tiles (dQ), so no atomics are needed.

Attention dropout draws its keep-mask with Philox from a seed held in a device tensor (no
host sync) at offset ``(b*H + h, i, j)``, so the backward pass, a recomputed forward and
``dropout_keep_mask`` (the test oracle) all see the same mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tile_bounds(LO, HI, lo_base, offs_m, SQ, SK):
    """Per-row interval (clamped to the keys), and the tile's union and intersection."""
    row_ok = offs_m < SQ
    lo = tl.load(LO + lo_base + offs_m, mask=row_ok, other=0)
    hi = tl.minimum(tl.load(HI + lo_base + offs_m, mask=row_ok, other=0), SK)
    union_lo = tl.min(tl.where(row_ok, lo, SK), 0)
    union_hi = tl.max(tl.where(row_ok, hi, 0), 0)
    inner_lo = tl.max(tl.where(row_ok, lo, 0), 0)
    inner_hi = tl.min(tl.where(row_ok, hi, SK), 0)
    return lo, hi, union_lo, union_hi, inner_lo, inner_hi


@triton.jit
def _keep(seed, bh, rows, cols, SQ, SK, dropout_p):
    offsets = (bh.to(tl.int64) * SQ + rows[:, None].to(tl.int64)) * SK + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    LO,
    HI,
    Out,
    LSE,
    SEED,
    sqb,
    sqh,
    sqs,
    skb,
    skh,
    sks,
    svb,
    svh,
    svs,
    sob,
    soh,
    sos,
    slb,
    H,
    SQ,
    SK,
    D,
    qk_scale,
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    lo, hi, union_lo, union_hi, inner_lo, inner_hi = _tile_bounds(LO, HI, b * slb, offs_m, SQ, SK)
    seed = tl.load(SEED) if DROPOUT else 0

    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
        mask=(offs_m[:, None] < SQ) & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    # finite: a row with no key yet stays NaN-free
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range((union_lo // BLOCK_N) * BLOCK_N, union_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < SK
        kt = tl.load(
            k_base + cols[None, :] * sks + offs_d[:, None],
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + cols[:, None] * svs + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, kt) * qk_scale
        # an interval edge crosses this tile
        if (start_n < inner_lo) | (start_n + BLOCK_N > inner_hi):
            s = tl.where(
                (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), s, float("-inf")
            )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(
                _keep(seed, bh, offs_m, cols, SQ, SK, dropout_p), p / (1.0 - dropout_p), 0.0
            )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    row_ok = offs_m < SQ
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + bh * SQ + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_preprocess(
    Out,
    DO,
    DELTA,
    sob,
    soh,
    sos,
    sdb,
    sdh,
    sds,
    H,
    SQ,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``delta_i = sum_d dO_id * O_id`` (= sum_j P_ij dP_ij, with or without dropout)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < SQ) & (offs_d[None, :] < D)
    o = tl.load(
        Out + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :], mask=mask, other=0.0
    )
    tl.store(
        DELTA + bh * SQ + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < SQ
    )


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    LO,
    HI,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    SEED,
    sqb,
    sqh,
    sqs,
    skb,
    skh,
    sks,
    svb,
    svh,
    svs,
    sdb,
    sdh,
    sds,
    slb,
    H,
    SQ,
    SK,
    D,
    qk_scale,
    sm_scale,
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """One key tile: walk the query tiles whose interval union meets it."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    col_ok = cols < SK
    start_n = pid_n * BLOCK_N
    seed = tl.load(SEED) if DROPOUT else 0
    k = tl.load(
        K + b * skb + h * skh + cols[:, None] * sks + offs_d[None, :],
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    v = tl.load(
        V + b * svb + h * svh + cols[:, None] * svs + offs_d[None, :],
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, SQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        lo, hi, union_lo, union_hi, inner_lo, inner_hi = _tile_bounds(
            LO, HI, b * slb, offs_m, SQ, SK
        )
        if (union_lo < start_n + BLOCK_N) & (union_hi > start_n):
            row_ok = offs_m < SQ
            q = tl.load(
                Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            do = tl.load(
                DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            lse = tl.load(LSE + bh * SQ + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * SQ + offs_m, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if (start_n < inner_lo) | (start_n + BLOCK_N > inner_hi):
                p = tl.where(
                    (cols[None, :] >= lo[:, None])
                    & (cols[None, :] < hi[:, None])
                    & row_ok[:, None],
                    p,
                    0.0,
                )
            dp = tl.dot(do, tl.trans(v))
            if DROPOUT:
                keep = _keep(seed, bh, offs_m, cols, SQ, SK, dropout_p)
                p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            else:
                p_drop = p
            dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    mask = col_ok[:, None] & d_ok[None, :]
    tl.store(
        DK + bh * SK * D + cols[:, None] * D + offs_d[None, :],
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        DV + bh * SK * D + cols[:, None] * D + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    LO,
    HI,
    DO,
    LSE,
    DELTA,
    DQ,
    SEED,
    sqb,
    sqh,
    sqs,
    skb,
    skh,
    sks,
    svb,
    svh,
    svs,
    sdb,
    sdh,
    sds,
    slb,
    H,
    SQ,
    SK,
    D,
    qk_scale,
    sm_scale,
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """One query tile: walk the key tiles of its interval union, as the forward pass does."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < SQ
    lo, hi, union_lo, union_hi, inner_lo, inner_hi = _tile_bounds(LO, HI, b * slb, offs_m, SQ, SK)
    seed = tl.load(SEED) if DROPOUT else 0
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    do = tl.load(
        DO + b * sdb + h * sdh + offs_m[:, None] * sds + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    lse = tl.load(LSE + bh * SQ + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * SQ + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range((union_lo // BLOCK_N) * BLOCK_N, union_hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < SK
        kt = tl.load(
            K + b * skb + h * skh + cols[None, :] * sks + offs_d[:, None],
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        vt = tl.load(
            V + b * svb + h * svh + cols[None, :] * svs + offs_d[:, None],
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = tl.dot(q, kt) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if (start_n < inner_lo) | (start_n + BLOCK_N > inner_hi):
            p = tl.where((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), p, 0.0)
        dp = tl.dot(do, vt)
        if DROPOUT:
            dp = tl.where(
                _keep(seed, bh, offs_m, cols, SQ, SK, dropout_p), dp / (1.0 - dropout_p), 0.0
            )
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    tl.store(
        DQ + bh * SQ * D + offs_m[:, None] * D + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _keep_mask_kernel(
    SEED, OUT, H, SQ, SK, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(SEED), bh, rows, cols, SQ, SK, dropout_p)
    tl.store(
        OUT + (bh * SQ + rows[:, None]) * SK + cols[None, :],
        keep.to(tl.int8),
        mask=(rows[:, None] < SQ) & (cols[None, :] < SK),
    )


def _blocks(head_dim: int, device: torch.device, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): FA2-style tiles on a GPU, small ones in the interpreter."""
    if device.type != "cuda":
        return 16, 16, 1, 1
    if backward:
        return (64, 64, 4, 2) if head_dim <= 64 else (64, 64, 8, 2)
    return (128, 64, 4, 3) if head_dim <= 64 else (128, 64, 8, 3)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class GLMFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_lo, attn_hi, dropout_p: float):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        b, h, sq, d = q.shape
        sk = k.shape[2]
        lo, hi = attn_lo.to(torch.int32).contiguous(), attn_hi.to(torch.int32).contiguous()
        seed = (
            torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64)
            if dropout_p > 0
            else lo
        )
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((b * h, sq), device=q.device, dtype=torch.float32)
        block_m, block_n, warps, stages = _blocks(d, q.device, backward=False)
        block_d = max(16, triton.next_power_of_2(d))
        sm_scale = d**-0.5
        grid = (triton.cdiv(sq, block_m), b * h)
        _fwd_kernel[grid](
            q,
            k,
            v,
            lo,
            hi,
            o,
            lse,
            seed,
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(o),
            lo.stride(0),
            h,
            sq,
            sk,
            d,
            sm_scale * LOG2E,
            dropout_p,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            DROPOUT=dropout_p > 0,
            num_warps=warps,
            num_stages=stages,
        )
        ctx.save_for_backward(q, k, v, lo, hi, o, lse, seed)
        ctx.dropout_p = dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, lo, hi, o, lse, seed = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        b, h, sq, d = q.shape
        sk = k.shape[2]
        block_m, block_n, warps, stages = _blocks(d, q.device, backward=True)
        block_d = max(16, triton.next_power_of_2(d))
        sm_scale = d**-0.5
        delta = torch.empty_like(lse)
        _bwd_preprocess[(triton.cdiv(sq, block_m), b * h)](
            o, do, delta, *_strides(o), *_strides(do), h, sq, d, BLOCK_M=block_m, BLOCK_D=block_d
        )
        dq = torch.empty((b, h, sq, d), device=q.device, dtype=q.dtype)
        dk = torch.empty((b, h, sk, d), device=q.device, dtype=k.dtype)
        dv = torch.empty((b, h, sk, d), device=q.device, dtype=v.dtype)
        common = (
            *_strides(q),
            *_strides(k),
            *_strides(v),
            *_strides(do),
            lo.stride(0),
            h,
            sq,
            sk,
            d,
            sm_scale * LOG2E,
            sm_scale,
            ctx.dropout_p,
        )
        meta = dict(
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            DROPOUT=ctx.dropout_p > 0,
            num_warps=warps,
            num_stages=stages,
        )
        _bwd_dkdv_kernel[(triton.cdiv(sk, block_n), b * h)](
            q, k, v, lo, hi, do, lse, delta, dk, dv, seed, *common, **meta
        )
        _bwd_dq_kernel[(triton.cdiv(sq, block_m), b * h)](
            q, k, v, lo, hi, do, lse, delta, dq, seed, *common, **meta
        )
        return dq, dk, dv, None, None, None


def glm_flash_attention(q, k, v, attn_lo, attn_hi, dropout_p: float = 0.0) -> torch.Tensor:
    """``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]``, bounds ``[B, Sq]`` -> ``[B, H, Sq, D]`` (Triton)."""
    return GLMFlashAttention.apply(q, k, v, attn_lo, attn_hi, float(dropout_p))


def dropout_keep_mask(
    seed: torch.Tensor, batch_heads: int, sq: int, sk: int, dropout_p: float
) -> torch.Tensor:
    """The keep-mask ``[B*H, Sq, Sk]`` (bool) that the kernels draw from ``seed``: the test oracle's input."""
    out = torch.empty((batch_heads, sq, sk), device=seed.device, dtype=torch.int8)
    _keep_mask_kernel[(triton.cdiv(sq, 16), triton.cdiv(sk, 16), batch_heads)](
        seed, out, 1, sq, sk, dropout_p, BLOCK_M=16, BLOCK_N=16
    )
    return out.bool()
