"""Megatron's learning-rate schedules: linear warm-up, then constant, linear, cosine,
inverse-square-root or WSD (warmup-stable-decay) to ``min_lr``.

The formulas are megatron-core's ``OptimizerParamScheduler``'s (tests hold ours to it, step by
step). One deliberate difference: Megatron's first step runs at the warm-up's ``lr * 0 /
warmup`` and learns nothing; here step ``s`` of the warm-up takes Megatron's ``s + 1``. The
schedule stays ours because megatron-core is a large dependency for one formula, and because
DeepSpeed's schedulers warm up differently (``WarmupLR`` logarithmically by default).
"""

from __future__ import annotations

import math

from megatron_glm.settings import DECAY_STYLES as STYLES
from megatron_glm.settings import WSD_STYLES


class LRSchedule:
    def __init__(
        self,
        lr: float,
        min_lr: float,
        style: str,
        warmup_iters: int,
        decay_iters: int,
        wsd_decay_iters: int | None = None,
        wsd_style: str = "exponential",
        consumed_before=None,
    ):
        """Lengths count iterations; with ``consumed_before`` (step -> samples before it) they count samples,
        as Megatron's do for ``--train-samples``, and a step advances the schedule by its batch."""
        if style not in STYLES:
            raise ValueError(f"unknown --lr-decay-style {style!r}; choose from {', '.join(STYLES)}")
        if not 0 <= min_lr <= lr:
            raise ValueError(f"need 0 <= --min-lr ({min_lr}) <= --lr ({lr})")
        if warmup_iters > decay_iters:
            raise ValueError(
                f"warm-up ({warmup_iters} iterations) is longer than the decay ({decay_iters})"
            )
        if style == "WSD":
            if wsd_decay_iters is None or not 0 < wsd_decay_iters <= decay_iters - warmup_iters:
                raise ValueError(
                    f"--lr-decay-style WSD needs --lr-wsd-decay-iters in 1..{decay_iters - warmup_iters} "
                    f"(the decay after the stable phase), got {wsd_decay_iters}"
                )
            if wsd_style not in WSD_STYLES:
                raise ValueError(
                    f"unknown --lr-wsd-decay-style {wsd_style!r}; choose from {', '.join(WSD_STYLES)}"
                )
        self.lr, self.min_lr, self.style = lr, min_lr, style
        self.warmup, self.decay = warmup_iters, decay_iters
        self.wsd_decay, self.wsd_style = wsd_decay_iters, wsd_style
        self.consumed_before = consumed_before

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): the first step already learns."""
        done = step + 1 if self.consumed_before is None else self.consumed_before(step + 1)
        if done <= self.warmup:
            return self.lr * done / self.warmup
        step = max(
            step if self.consumed_before is None else self.consumed_before(step), self.warmup
        )
        if self.style == "constant":
            return self.lr
        if step > self.decay:
            return self.min_lr
        if self.style == "inverse-square-root":
            return max(
                self.min_lr, self.lr * math.sqrt(max(self.warmup, 1)) / math.sqrt(max(step, 1))
            )
        progress = (step - self.warmup) / max(self.decay - self.warmup, 1)
        if self.style == "linear":
            factor = 1.0 - progress
        elif self.style == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # WSD: lr until the last wsd_decay iterations, then down to min_lr
            anneal_start = self.decay - self.wsd_decay
            if step <= anneal_start:
                factor = 1.0
            else:
                ratio = (step - anneal_start) / self.wsd_decay
                factor = {
                    "linear": 1.0 - ratio,
                    "cosine": 0.5 * (1.0 + math.cos(math.pi * ratio)),
                    "exponential": 2.0 * 0.5**ratio - 1.0,
                    "minus_sqrt": 1.0 - math.sqrt(ratio),
                }[self.wsd_style]
        return self.min_lr + (self.lr - self.min_lr) * factor

    def as_torch(self, optimizer):
        """A LambdaLR whose state (its step count) checkpoints with the engine."""
        import torch

        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self(step) / self.lr if self.lr else 0.0
        )


# the flags that set each recorded value: (by iterations, by samples)
_FLAGS = {
    "lr": ("--lr",) * 2,
    "min_lr": ("--min-lr",) * 2,
    "decay_style": ("--lr-decay-style",) * 2,
    "warmup": (
        "--lr-warmup-iters/--lr-warmup-fraction",
        "--lr-warmup-samples/--lr-warmup-fraction",
    ),
    "decay": (
        "--lr-decay-iters (default --train-iters)",
        "--lr-decay-samples (default --train-samples)",
    ),
    "wsd_decay": ("--lr-wsd-decay-iters", "--lr-wsd-decay-samples"),
    "wsd_style": ("--lr-wsd-decay-style",) * 2,
    "counts": ("--train-iters/--train-samples",) * 2,
}


def schedule_differences(saved: dict, now: dict) -> list[str]:
    """Each value of the flags' schedule that is not the checkpoint's, named by its flag."""
    by_samples = now.get("counts") == "samples"
    return [
        f"{_FLAGS[key][by_samples]} gives {now.get(key)}, the checkpoint {saved.get(key)}"
        for key in _FLAGS
        if key in saved and saved.get(key) != now.get(key)
    ]
