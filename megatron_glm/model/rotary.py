"""2D rotary position embedding (ChatGLM-6B): half of each head rotated by each position row.

The first half of a head's dimensions is rotated by row 0 of ``position_ids`` (position in
the corrupted text), the second half by row 1 (position inside a blank), each with the
standard RoPE of dimension ``head_dim / 2`` (rotate-half convention, base 10000).
"""

from __future__ import annotations

import torch


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """``x [B, H, S, d]`` rotated by ``positions [B, S]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.float()[..., None] * inv_freq  # [B, S, d/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def apply_rotary_2d(x: torch.Tensor, position_ids: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """``x [B, H, S, D]``, ``position_ids [B, 2, S]`` -> ``x`` with both halves rotated."""
    half = x.shape[-1] // 2
    return torch.cat(
        [_rope(x[..., :half], position_ids[:, 0], base), _rope(x[..., half:], position_ids[:, 1], base)], dim=-1
    )
