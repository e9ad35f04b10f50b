"""Plain torch references of every kernel: the test oracle, and the path off CUDA.

They compute what the original GLM implementation computes, with the dense ``[S, S]``
mask built from the interval bounds; ``tests/test_kernels.py`` checks them
against an independent dense-mask construction before trusting them as an oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def interval_mask(attn_lo: torch.Tensor, attn_hi: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Dense boolean ``[B, Sq, Sk]`` mask from the bounds (True = may attend)."""
    j = torch.arange(num_keys, device=attn_lo.device)
    return (j >= attn_lo[..., None]) & (j < attn_hi[..., None])


def attention_reference(q, k, v, attn_lo, attn_hi, dropout_p: float = 0.0, keep_mask=None):
    """Scores, masked fp32 softmax, dropout, weighted sum: ``[B, H, Sq, D]`` in ``q.dtype``.

    ``keep_mask [B, H, Sq, Sk]`` replaces the dropout draw (to compare with a kernel's mask).
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    probs = masked_softmax_reference(scores, attn_lo, attn_hi, q.shape[-1] ** -0.5)
    if keep_mask is not None:
        probs = probs * keep_mask / (1.0 - dropout_p)
    elif dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v.float()).to(q.dtype)


def masked_softmax_reference(scores, attn_lo, attn_hi, scale: float = 1.0):
    """``softmax(scale * scores)`` over each row's key interval, in fp32, returned in ``scores.dtype``."""
    mask = interval_mask(attn_lo, attn_hi, scores.shape[-1])[:, None]
    probs = torch.softmax((scores.float() * scale).masked_fill(~mask, float("-inf")), dim=-1)
    return probs.to(scores.dtype)


def embedding_2d_reference(tokens, position_ids, word_weight, position_weight, block_weight):
    """Word + position + block-position embeddings: three gathers and two adds."""
    return (
        F.embedding(tokens, word_weight)
        + F.embedding(position_ids[:, 0], position_weight)
        + F.embedding(position_ids[:, 1], block_weight)
    )


def inv_freq(head_dim: int, base: float, device) -> torch.Tensor:
    """RoPE frequencies of one half-head, ``[head_dim / 4]`` fp32 (the kernel uses the same tensor)."""
    d = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))


def _rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, d]`` rotated by ``positions [B, S]`` (rotate-half convention)."""
    angles = positions.float()[..., None] * freqs  # [B, S, d/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def rotary_1d_reference(
    x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0
) -> torch.Tensor:
    """1D rotary (GLM-130B): the whole head rotated by ``positions [B, S]``, rotate-half convention."""
    return _rope(
        x, positions, inv_freq(2 * x.shape[-1], base, x.device)
    )  # a "half-head" of all of it


def rotary_2d_reference(
    x: torch.Tensor, position_ids: torch.Tensor, base: float = 10000.0
) -> torch.Tensor:
    """2D rotary (ChatGLM-6B): first half of each head rotated by ``position_ids[:, 0]``, second by ``[:, 1]``."""
    half = x.shape[-1] // 2
    freqs = inv_freq(x.shape[-1], base, x.device)
    return torch.cat(
        [
            _rope(x[..., :half], position_ids[:, 0], freqs),
            _rope(x[..., half:], position_ids[:, 1], freqs),
        ],
        dim=-1,
    )
