"""2D rotary embedding applied to Q and K in one Triton pass.

Each head splits into quarters ``(a1, a2, b1, b2)``: ``(a1, a2)`` is rotated by row 0 of
``position_ids`` and ``(b1, b2)`` by row 1, with the rotate-half RoPE of dimension
``head_dim / 2`` (see the torch reference). The unfused path builds cos/sin tables,
concatenates halves and rotates Q and K separately (about ten passes); here one program
computes the angles once for a tile of positions and rotates Q and K from the strided
``qkv`` views directly. A rotation's transpose is the rotation by minus the angle, so the
backward pass is the same kernel with ``sign = -1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_glm.kernels.reference import inv_freq


@triton.jit
def _rotate(X, OUT, base_in, base_out, offs_s, offs_q, sxs, Q, c0, s0, c1, s1, mask):
    ptr = X + base_in + offs_s[:, None] * sxs + offs_q[None, :]
    a1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    a2 = tl.load(ptr + Q, mask=mask, other=0.0).to(tl.float32)
    b1 = tl.load(ptr + 2 * Q, mask=mask, other=0.0).to(tl.float32)
    b2 = tl.load(ptr + 3 * Q, mask=mask, other=0.0).to(tl.float32)
    out = OUT + base_out + offs_s[:, None] * (4 * Q) + offs_q[None, :]
    dtype = OUT.dtype.element_ty
    tl.store(out, (a1 * c0 - a2 * s0).to(dtype), mask=mask)
    tl.store(out + Q, (a2 * c0 + a1 * s0).to(dtype), mask=mask)
    tl.store(out + 2 * Q, (b1 * c1 - b2 * s1).to(dtype), mask=mask)
    tl.store(out + 3 * Q, (b2 * c1 + b1 * s1).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    QX,
    KX,
    QO,
    KO,
    POS,
    INV_FREQ,
    sqb,
    sqh,
    sqs,
    skb,
    skh,
    sks,
    H,
    S,
    Q,
    sign,
    BLOCK_S: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    pid_s, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_q = tl.arange(0, BLOCK_Q)
    s_ok = offs_s < S
    mask = s_ok[:, None] & (offs_q[None, :] < Q)
    inv_freq = tl.load(INV_FREQ + offs_q, mask=offs_q < Q, other=0.0)
    pos0 = tl.load(POS + b * 2 * S + offs_s, mask=s_ok, other=0).to(tl.float32)
    pos1 = tl.load(POS + b * 2 * S + S + offs_s, mask=s_ok, other=0).to(tl.float32)
    ang0 = pos0[:, None] * inv_freq[None, :]
    ang1 = pos1[:, None] * inv_freq[None, :]
    c0, s0 = tl.cos(ang0), sign * tl.sin(ang0)
    c1, s1 = tl.cos(ang1), sign * tl.sin(ang1)
    out_base = bh.to(tl.int64) * S * 4 * Q
    _rotate(QX, QO, b * sqb + h * sqh, out_base, offs_s, offs_q, sqs, Q, c0, s0, c1, s1, mask)
    _rotate(KX, KO, b * skb + h * skh, out_base, offs_s, offs_q, sks, Q, c0, s0, c1, s1, mask)


def _launch(q, k, position_ids, freqs, sign: float):
    b, h, s, d = q.shape
    quarter = d // 4
    qo = torch.empty((b, h, s, d), device=q.device, dtype=q.dtype)
    ko = torch.empty((b, h, s, d), device=k.device, dtype=k.dtype)
    block_s = 32 if q.device.type == "cuda" else 8
    grid = (triton.cdiv(s, block_s), b * h)
    _rotary_kernel[grid](
        q,
        k,
        qo,
        ko,
        position_ids,
        freqs,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        h,
        s,
        quarter,
        sign,
        BLOCK_S=block_s,
        BLOCK_Q=max(2, triton.next_power_of_2(quarter)),
        num_warps=4 if q.device.type == "cuda" else 1,
    )
    return qo, ko


class Rotary2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, position_ids, base: float):
        q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
        pos = position_ids.contiguous()
        freqs = inv_freq(q.shape[-1], base, q.device)
        ctx.save_for_backward(pos, freqs)
        return _launch(q, k, pos, freqs, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        pos, freqs = ctx.saved_tensors
        dq = torch.zeros_like(dk) if dq is None else dq.contiguous()
        dk = torch.zeros_like(dq) if dk is None else dk.contiguous()
        gq, gk = _launch(dq, dk, pos, freqs, -1.0)
        return gq, gk, None, None


def rotary_2d_qk(q, k, position_ids, base: float = 10000.0):
    """``q, k [B, H, S, D]`` (strided views allowed), ``position_ids [B, 2, S]`` -> rotated ``(q, k)`` (Triton)."""
    return Rotary2D.apply(q, k, position_ids, float(base))
