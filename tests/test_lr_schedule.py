"""The learning-rate schedules against megatron-core's OptimizerParamScheduler, step by step."""

import warnings

import pytest
import torch

from megatron_glm.training.lr_schedule import LRSchedule

LR, MIN_LR, WARMUP, DECAY = 3e-4, 3e-5, 10, 100


def megatron(style: str, wsd_decay=None, wsd_style=None):
    """megatron-core's scheduler: the learning rate of each step, as Megatron's loop applies it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no Transformer Engine / apex here
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = OptimizerParamScheduler(optimizer, 0.0, LR, MIN_LR, WARMUP, DECAY, style, 0.0, 0.0, DECAY, "constant",
                                        wsd_decay_steps=wsd_decay, lr_wsd_decay_style=wsd_style)
    rates = []
    for _ in range(DECAY + 20):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this step runs with
        scheduler.step(1)
    return rates


@pytest.mark.parametrize("style, wsd_style", [("constant", None), ("linear", None), ("cosine", None),
                                              ("inverse-square-root", None), ("WSD", "exponential"),
                                              ("WSD", "linear"), ("WSD", "cosine"), ("WSD", "minus_sqrt")])
def test_the_schedule_is_megatrons(style, wsd_style):
    wsd_decay = 30 if style == "WSD" else None
    ours = LRSchedule(LR, MIN_LR, style, WARMUP, DECAY, wsd_decay, wsd_style or "exponential")
    theirs = megatron(style, wsd_decay, wsd_style)
    # warm-up: our step s runs at Megatron's s + 1 (its first step has a rate of 0 and learns nothing)
    assert [ours(s) for s in range(WARMUP)] == pytest.approx(theirs[1:WARMUP + 1], rel=1e-12)
    assert [ours(s) for s in range(WARMUP, DECAY + 20)] == pytest.approx(theirs[WARMUP:], rel=1e-12)
    assert theirs[0] == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(style="WSD", wsd_decay_iters=None), "needs --lr-wsd-decay-iters"),
    (dict(style="WSD", wsd_decay_iters=95), "needs --lr-wsd-decay-iters in 1..90"),
    (dict(style="WSD", wsd_decay_iters=10, wsd_style="step"), "unknown --lr-wsd-decay-style"),
    (dict(style="exponential"), "unknown --lr-decay-style"),
])
def test_a_schedule_that_cannot_run_is_refused(kwargs, message):
    style = kwargs.pop("style")
    with pytest.raises(ValueError, match=message):
        LRSchedule(LR, MIN_LR, style, WARMUP, DECAY, **kwargs)
