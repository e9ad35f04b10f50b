"""Megatron's learning-rate schedule: linear warm-up, then constant, linear or cosine decay to ``min_lr``."""

from __future__ import annotations

import math


class LRSchedule:
    def __init__(self, lr: float, min_lr: float, style: str, warmup_iters: int, decay_iters: int):
        if style not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown --lr-decay-style {style!r}")
        if not 0 <= min_lr <= lr:
            raise ValueError(f"need 0 <= --min-lr ({min_lr}) <= --lr ({lr})")
        if warmup_iters > decay_iters:
            raise ValueError(f"warm-up ({warmup_iters} iterations) is longer than the decay ({decay_iters})")
        self.lr, self.min_lr, self.style = lr, min_lr, style
        self.warmup, self.decay = warmup_iters, decay_iters

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): the first step already learns."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.style == "constant":
            return self.lr
        if step >= self.decay:
            return self.min_lr
        progress = (step - self.warmup) / max(self.decay - self.warmup, 1)
        if self.style == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.lr - self.min_lr) * factor

    def as_torch(self, optimizer):
        """A LambdaLR whose state (its step count) checkpoints with the engine."""
        import torch

        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self(step) / self.lr if self.lr else 0.0)
