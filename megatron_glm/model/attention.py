"""Attention under GLM's interval mask: query ``i`` sees exactly the keys ``attn_lo[i] <= j < attn_hi[i]``.

Every GLM mask (bidirectional Part A, causal Part B, packed segments, padding) is one key
interval per query (DESIGN.md), so the model passes the bounds, never a dense mask. This
module is the one place an attention implementation is chosen: ``sdpa`` (PyTorch's fused
attention with the mask built from the bounds) by default, ``eager`` (explicit fp32 softmax,
what the original implementation computes) as the reference. The fused Triton kernel of
``megatron_glm.kernels`` plugs in here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("sdpa", "eager")


def interval_mask(attn_lo: torch.Tensor, attn_hi: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Dense boolean ``[B, Sq, Sk]`` mask from the bounds (True = may attend)."""
    j = torch.arange(num_keys, device=attn_lo.device)
    return (j >= attn_lo[..., None]) & (j < attn_hi[..., None])


def interval_attention(q, k, v, attn_lo, attn_hi, dropout_p: float = 0.0, impl: str = "sdpa"):
    """``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]``, bounds ``[B, Sq]`` in key indices -> ``[B, H, Sq, D]``."""
    mask = interval_mask(attn_lo, attn_hi, k.shape[-2])[:, None]
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if impl == "eager":
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        probs = F.dropout(probs, dropout_p) if dropout_p else probs
        return torch.matmul(probs, v.float()).to(q.dtype)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
