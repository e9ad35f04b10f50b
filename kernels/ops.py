"""The kernels' entry points: each picks Triton or its torch reference through ``dispatch``.

Triton modules are imported only when a Triton kernel actually runs, so CPU runs never need Triton.

- ``flash_attention``: attention under the interval mask, never building it.
- ``masked_softmax``: scale + interval mask + softmax on materialised scores.
- ``embedding_2d``: word + position + block-position embeddings in one pass.
- ``rotary_2d``: 2D rotary applied to Q and K in one pass; ``rotary_1d``: GLM-130B's (the reference).

``flex_attention`` is PyTorch's FlexAttention over the same mask, for comparison and as a path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megatron_glm.kernels import reference
from megatron_glm.kernels.dispatch import BACKENDS, get_backend, set_backend, use_triton

__all__ = [
    "BACKENDS",
    "get_backend",
    "set_backend",
    "flash_attention",
    "flex_attention",
    "softmax_attention",
    "masked_softmax",
    "embedding_2d",
    "rotary_1d",
    "rotary_2d",
    "sdpa_attention",
]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def _flash_unsupported(q, k, v) -> str | None:
    if q.dtype not in _FLOAT or not (q.dtype == k.dtype == v.dtype):
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (needs one of fp16, bf16, fp32 for q, k and v)"
    if q.is_cuda and q.dtype == torch.float32:
        return "fp32 inputs (the GPU kernel computes in fp16/bf16 with fp32 accumulation)"
    if q.shape[-1] > 128 or q.shape[-1] < 4:
        return f"head dim {q.shape[-1]} (the flash kernel takes 4..128)"
    return None


def sdpa_attention(q, k, v, attn_lo, attn_hi, dropout_p: float = 0.0):
    """PyTorch's fused attention with the dense mask built from the bounds (memory quadratic in S)."""
    mask = reference.interval_mask(attn_lo, attn_hi, k.shape[-2])[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def flash_attention(q, k, v, attn_lo, attn_hi, dropout_p: float = 0.0):
    """GLM-mask flash attention (Triton), or SDPA with the dense mask where the kernel does not run."""
    if use_triton("flash_attention", q.device, _flash_unsupported(q, k, v)):
        from megatron_glm.kernels.triton_attention import glm_flash_attention

        return glm_flash_attention(q, k, v, attn_lo, attn_hi, dropout_p)
    return sdpa_attention(q, k, v, attn_lo, attn_hi, dropout_p)


_last_block_mask: tuple = ()  # (attn_lo, attn_hi, Sq, Sk, block mask): every layer of a forward shares the bounds


def _block_mask(attn_lo, attn_hi, sq: int, sk: int):
    """FlexAttention's block mask of the interval mask, built once per bounds tensors (held, so never confused)."""
    global _last_block_mask
    if (
        _last_block_mask
        and _last_block_mask[0] is attn_lo
        and _last_block_mask[1] is attn_hi
        and _last_block_mask[2:4] == (sq, sk)
    ):
        return _last_block_mask[4]
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= attn_lo[b, q_idx]) & (kv_idx < attn_hi[b, q_idx])

    mask = create_block_mask(mask_mod, attn_lo.shape[0], None, sq, sk, device=str(attn_lo.device))
    _last_block_mask = (attn_lo, attn_hi, sq, sk, mask)
    return mask


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q, k, v, attn_lo, attn_hi, dropout_p: float = 0.0):
    """PyTorch's FlexAttention over the interval mask (a block mask; compiled on CUDA, where it is fast)."""
    if dropout_p:
        raise ValueError(
            "--attention-impl flex has no attention dropout: pass --attention-dropout 0, or use flash"
        )
    from torch.nn.attention.flex_attention import flex_attention as flex

    block_mask = _block_mask(attn_lo, attn_hi, q.shape[-2], k.shape[-2])
    return (_compiled_flex() if q.is_cuda else flex)(q, k, v, block_mask=block_mask)


def masked_softmax(scores, attn_lo, attn_hi, scale: float = 1.0):
    """``softmax(scale * scores)`` over each row's key interval (Triton, or the torch reference)."""
    if use_triton(
        "masked_softmax", scores.device, None if scores.dtype in _FLOAT else f"dtype {scores.dtype}"
    ):
        from megatron_glm.kernels.triton_softmax import glm_masked_softmax

        return glm_masked_softmax(scores, attn_lo, attn_hi, scale)
    return reference.masked_softmax_reference(scores, attn_lo, attn_hi, scale)


def softmax_attention(q, k, v, attn_lo, attn_hi, dropout_p: float = 0.0):
    """Materialised scores in the input dtype, the fused masked softmax, dropout, weighted sum."""
    probs = masked_softmax(
        torch.matmul(q, k.transpose(-1, -2)), attn_lo, attn_hi, q.shape[-1] ** -0.5
    )
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def embedding_2d(tokens, position_ids, word_weight, position_weight, block_weight):
    """Word + position + block-position embeddings, ``[B, S, H]`` (one Triton pass, or three gathers)."""
    weights = (word_weight, position_weight, block_weight)
    dtypes = {w.dtype for w in weights}
    unsupported = (
        None
        if len(dtypes) == 1 and word_weight.dtype in _FLOAT
        else f"table dtypes {sorted(map(str, dtypes))}"
    )
    if use_triton("embedding_2d", word_weight.device, unsupported):
        from megatron_glm.kernels.triton_embedding import glm_embedding_2d

        return glm_embedding_2d(tokens, position_ids, *weights)
    return reference.embedding_2d_reference(tokens, position_ids, *weights)


def rotary_1d(q, k, positions, base: float = 10000.0):
    """1D rotary (GLM-130B) applied to ``q`` and ``k`` ``[B, H, S, D]`` by ``positions [B, S]`` (the torch
    reference: GLM-130B's pairing rotates dimension i with i + D/2, not the 2D kernel's halves)."""
    return reference.rotary_1d_reference(q, positions, base), reference.rotary_1d_reference(
        k, positions, base
    )


def rotary_2d(q, k, position_ids, base: float = 10000.0):
    """2D rotary applied to ``q`` and ``k`` ``[B, H, S, D]`` (one Triton pass, or the reference twice)."""
    unsupported = (
        None
        if q.shape == k.shape and q.shape[-1] % 4 == 0
        else f"q {tuple(q.shape)} / k {tuple(k.shape)}"
    )
    if use_triton("rotary_2d", q.device, unsupported):
        from megatron_glm.kernels.triton_rotary import rotary_2d_qk

        return rotary_2d_qk(q, k, position_ids, base)
    return reference.rotary_2d_reference(q, position_ids, base), reference.rotary_2d_reference(
        k, position_ids, base
    )
