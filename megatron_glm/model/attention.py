"""Attention under GLM's interval mask: query ``i`` sees exactly the keys ``attn_lo[i] <= j < attn_hi[i]``.

Every GLM mask (bidirectional Part A, causal Part B, packed segments, padding) is one key
interval per query (``attn_lo <= j < attn_hi``), so the model passes the bounds, never a dense mask. This
module is the one place an attention algorithm is chosen (``--attention-impl``):

- ``flash``: the Triton GLM-mask flash kernel (``megatron_glm.kernels``); memory linear in S;
- ``softmax``: materialised scores with the fused Triton masked softmax;
- ``sdpa``: PyTorch's fused attention with the dense mask built from the bounds;
- ``flex``: PyTorch's FlexAttention with the interval mask as a block mask (no dropout; GPUs
  only for training: it has no backward on the CPU);
- ``eager``: explicit fp32 softmax, what the original implementation computes (the reference);
- ``auto`` (default): ``flash`` on CUDA, ``sdpa`` elsewhere.

``flash`` and ``softmax`` run their torch fallbacks where Triton does not (see ``kernels.dispatch``).
"""

from __future__ import annotations

from megatron_glm import kernels
from megatron_glm.kernels.reference import attention_reference, interval_mask

IMPLEMENTATIONS = ("auto", "flash", "softmax", "sdpa", "flex", "eager")

__all__ = ["IMPLEMENTATIONS", "interval_attention", "interval_mask"]


def interval_attention(q, k, v, attn_lo, attn_hi, dropout_p: float = 0.0, impl: str = "auto"):
    """``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]``, bounds ``[B, Sq]`` in key indices -> ``[B, H, Sq, D]``."""
    if impl == "auto":
        impl = "flash" if q.is_cuda else "sdpa"
    if impl == "flash":
        return kernels.flash_attention(q, k, v, attn_lo, attn_hi, dropout_p)
    if impl == "softmax":
        return kernels.softmax_attention(q, k, v, attn_lo, attn_hi, dropout_p)
    if impl == "sdpa":
        return kernels.sdpa_attention(q, k, v, attn_lo, attn_hi, dropout_p)
    if impl == "flex":
        return kernels.flex_attention(q, k, v, attn_lo, attn_hi, dropout_p)
    if impl == "eager":
        return attention_reference(q, k, v, attn_lo, attn_hi, dropout_p)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
