"""GLM's input embedding in one Triton pass: word + position + block-position rows, summed.

The unfused path gathers three ``[B, S, H]`` tensors and adds them in two more passes;
this kernel reads the three rows and writes the sum once. The backward pass reads the
output gradient once and adds it into all three tables with fp32 atomics, so repeated
indices (every Part A token shares block position 0) accumulate correctly; the fp32
buffers are cast to the tables' dtype at the end. Atomic order makes the gradient
nondeterministic in its last bits on a GPU, like ``index_add_``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fwd_kernel(
    TOK, POS, BPOS, W, P, BP, OUT, N, S, HID, sw, sp, sbp, ROWS: tl.constexpr, BLOCK_H: tl.constexpr
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < HID)
    b, s = rows // S, rows % S
    tok = tl.load(TOK + rows, mask=row_ok, other=0).to(tl.int64)
    pos = tl.load(POS + b * 2 * S + s, mask=row_ok, other=0).to(tl.int64)  # position_ids[b, 0, s]
    bpos = tl.load(BPOS + b * 2 * S + s, mask=row_ok, other=0).to(tl.int64)  # position_ids[b, 1, s]
    acc = tl.load(W + tok[:, None] * sw + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(P + pos[:, None] * sp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(BP + bpos[:, None] * sbp + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(
        OUT + rows.to(tl.int64)[:, None] * HID + cols[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _bwd_kernel(
    TOK, POS, BPOS, DOUT, DW, DP, DBP, N, S, HID, ROWS: tl.constexpr, BLOCK_H: tl.constexpr
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < HID)
    b, s = rows // S, rows % S
    g = tl.load(DOUT + rows.to(tl.int64)[:, None] * HID + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    tok = tl.load(TOK + rows, mask=row_ok, other=0).to(tl.int64)
    pos = tl.load(POS + b * 2 * S + s, mask=row_ok, other=0).to(tl.int64)
    bpos = tl.load(BPOS + b * 2 * S + s, mask=row_ok, other=0).to(tl.int64)
    tl.atomic_add(DW + tok[:, None] * HID + cols[None, :], g, mask=mask)
    tl.atomic_add(DP + pos[:, None] * HID + cols[None, :], g, mask=mask)
    tl.atomic_add(DBP + bpos[:, None] * HID + cols[None, :], g, mask=mask)


def _tiles(hidden: int, device: torch.device) -> tuple[int, int, int]:
    """(ROWS, BLOCK_H, num_warps)."""
    block_h = min(1024, triton.next_power_of_2(hidden))
    if device.type != "cuda":
        return 4, block_h, 1
    return 4, block_h, max(1, min(8, block_h // 128))


class GLMEmbedding2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, position_ids, word_weight, position_weight, block_weight):
        b, s = tokens.shape
        hidden = word_weight.shape[1]
        tok = tokens.contiguous()
        pos = position_ids.contiguous()
        out = torch.empty((b, s, hidden), device=word_weight.device, dtype=word_weight.dtype)
        rows, block_h, warps = _tiles(hidden, out.device)
        grid = (triton.cdiv(b * s, rows), triton.cdiv(hidden, block_h))
        _fwd_kernel[grid](
            tok,
            pos,
            pos[:, 1],
            word_weight,
            position_weight,
            block_weight,
            out,
            b * s,
            s,
            hidden,
            word_weight.stride(0),
            position_weight.stride(0),
            block_weight.stride(0),
            ROWS=rows,
            BLOCK_H=block_h,
            num_warps=warps,
        )
        ctx.save_for_backward(tok, pos)
        ctx.shapes = [(w.shape, w.dtype) for w in (word_weight, position_weight, block_weight)]
        return out

    @staticmethod
    def backward(ctx, dout):
        tok, pos = ctx.saved_tensors
        b, s = tok.shape
        hidden = dout.shape[-1]
        grads = [
            torch.zeros(shape, device=dout.device, dtype=torch.float32) for shape, _ in ctx.shapes
        ]
        rows, block_h, warps = _tiles(hidden, dout.device)
        grid = (triton.cdiv(b * s, rows), triton.cdiv(hidden, block_h))
        _bwd_kernel[grid](
            tok,
            pos,
            pos[:, 1],
            dout.contiguous(),
            *grads,
            b * s,
            s,
            hidden,
            ROWS=rows,
            BLOCK_H=block_h,
            num_warps=warps,
        )
        return (None, None, *(g.to(dtype) for g, (_, dtype) in zip(grads, ctx.shapes)))


def glm_embedding_2d(
    tokens, position_ids, word_weight, position_weight, block_weight
) -> torch.Tensor:
    """``tokens [B, S]``, ``position_ids [B, 2, S]`` -> ``[B, S, H]`` = word + position + block position (Triton)."""
    return GLMEmbedding2D.apply(tokens, position_ids, word_weight, position_weight, block_weight)
