"""GLM-mask softmax in Triton: ``softmax(scale * scores)`` over each row's key interval, zero elsewhere.

For the attention paths that materialise the scores (and head dims the flash kernel does
not take). Fusing the scale, the mask and the softmax reads the scores once and never
builds the mask; keys outside ``[attn_lo[i], attn_hi[i])`` are not even read. Rows of up
to ``MAX_SINGLE`` keys stay in registers (one read, one write); longer rows run an online
max/sum pass and a write pass, so there is no length cap (Megatron's fused masked softmax
stops at 4096). Statistics are fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_SINGLE = 8192
CHUNK = 4096


@triton.jit
def _row_bounds(LO, HI, row, H, SQ, SK, slb):
    i = row % SQ
    b = row // SQ // H
    lo = tl.load(LO + b * slb + i)
    hi = tl.minimum(tl.load(HI + b * slb + i), SK)
    return lo, hi


@triton.jit
def _fwd_kernel(X, Y, LO, HI, H, SQ, SK, slb, scale, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0)
    lo, hi = _row_bounds(LO, HI, row, H, SQ, SK, slb)
    x_row = X + row.to(tl.int64) * SK
    y_row = Y + row.to(tl.int64) * SK
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        inside = (offs >= lo) & (offs < hi)
        x = tl.load(x_row + offs, mask=inside, other=float("-inf")).to(tl.float32) * scale
        e = tl.exp(x - tl.max(x, 0))
        tl.store(y_row + offs, (e / tl.sum(e, 0)).to(Y.dtype.element_ty), mask=offs < SK)
    else:
        m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range((lo // BLOCK) * BLOCK, hi, BLOCK):
            cols = start + offs
            x = (
                tl.load(x_row + cols, mask=(cols >= lo) & (cols < hi), other=float("-inf")).to(
                    tl.float32
                )
                * scale
            )
            m_new = tl.maximum(m, x)
            # lanes with no key yet: exp(-inf) = 0, no NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            m = m_new
        m_row = tl.max(m, 0)
        l_row = tl.sum(s * tl.exp(m - m_row), 0)
        for start in range(0, SK, BLOCK):
            cols = start + offs
            inside = (cols >= lo) & (cols < hi)
            x = tl.load(x_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * scale
            tl.store(
                y_row + cols, (tl.exp(x - m_row) / l_row).to(Y.dtype.element_ty), mask=cols < SK
            )


@triton.jit
def _bwd_kernel(
    Y, DY, DX, LO, HI, H, SQ, SK, slb, scale, BLOCK: tl.constexpr, SINGLE: tl.constexpr
):
    """``dx = scale * y * (dy - sum(dy * y))``; zero outside the interval, where ``y`` is zero."""
    row = tl.program_id(0)
    lo, hi = _row_bounds(LO, HI, row, H, SQ, SK, slb)
    base = row.to(tl.int64) * SK
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        inside = (offs >= lo) & (offs < hi)
        y = tl.load(Y + base + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + offs, mask=inside, other=0.0).to(tl.float32)
        dx = scale * y * (dy - tl.sum(y * dy, 0))
        tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=offs < SK)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range((lo // BLOCK) * BLOCK, hi, BLOCK):
            cols = start + offs
            inside = (cols >= lo) & (cols < hi)
            y = tl.load(Y + base + cols, mask=inside, other=0.0).to(tl.float32)
            acc += y * tl.load(DY + base + cols, mask=inside, other=0.0).to(tl.float32)
        dot = tl.sum(acc, 0)
        for start in range(0, SK, BLOCK):
            cols = start + offs
            inside = (cols >= lo) & (cols < hi)
            y = tl.load(Y + base + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(
                DX + base + cols, (scale * y * (dy - dot)).to(DX.dtype.element_ty), mask=cols < SK
            )


def _launch_shape(sk: int, device: torch.device, single: bool | None) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE, num_warps); in the interpreter the chunked path uses small chunks to run cheaply."""
    single = sk <= MAX_SINGLE if single is None else single
    block = triton.next_power_of_2(sk) if single else (CHUNK if device.type == "cuda" else 64)
    warps = min(16, max(1, block // 256)) if device.type == "cuda" else 1
    return block, single, warps


class GLMMaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, attn_lo, attn_hi, scale: float, single: bool | None):
        x = scores.contiguous()
        b, h, sq, sk = x.shape
        lo, hi = attn_lo.to(torch.int32).contiguous(), attn_hi.to(torch.int32).contiguous()
        y = torch.empty_like(x)
        block, single, warps = _launch_shape(sk, x.device, single)
        _fwd_kernel[(b * h * sq,)](
            x,
            y,
            lo,
            hi,
            h,
            sq,
            sk,
            lo.stride(0),
            scale,
            BLOCK=block,
            SINGLE=single,
            num_warps=warps,
        )
        ctx.save_for_backward(y, lo, hi)
        ctx.scale, ctx.block, ctx.single, ctx.warps = scale, block, single, warps
        return y

    @staticmethod
    def backward(ctx, dy):
        y, lo, hi = ctx.saved_tensors
        b, h, sq, sk = y.shape
        dx = torch.empty_like(y)
        _bwd_kernel[(b * h * sq,)](
            y,
            dy.contiguous(),
            dx,
            lo,
            hi,
            h,
            sq,
            sk,
            lo.stride(0),
            ctx.scale,
            BLOCK=ctx.block,
            SINGLE=ctx.single,
            num_warps=ctx.warps,
        )
        return dx, None, None, None, None


def glm_masked_softmax(
    scores, attn_lo, attn_hi, scale: float = 1.0, single: bool | None = None
) -> torch.Tensor:
    """``scores [B, H, Sq, Sk]``, bounds ``[B, Sq]`` -> probabilities in ``scores.dtype`` (Triton).

    ``single`` forces the one-pass (row in registers) or chunked path; tests use it to run
    both on small rows.
    """
    return GLMMaskedSoftmax.apply(scores, attn_lo, attn_hi, float(scale), single)
