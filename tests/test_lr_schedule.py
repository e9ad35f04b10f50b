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
    scheduler = OptimizerParamScheduler(
        optimizer,
        0.0,
        LR,
        MIN_LR,
        WARMUP,
        DECAY,
        style,
        0.0,
        0.0,
        DECAY,
        "constant",
        wsd_decay_steps=wsd_decay,
        lr_wsd_decay_style=wsd_style,
    )
    rates = []
    for _ in range(DECAY + 20):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this step runs with
        scheduler.step(1)
    return rates


@pytest.mark.parametrize(
    "style, wsd_style",
    [
        ("constant", None),
        ("linear", None),
        ("cosine", None),
        ("inverse-square-root", None),
        ("WSD", "exponential"),
        ("WSD", "linear"),
        ("WSD", "cosine"),
        ("WSD", "minus_sqrt"),
    ],
)
def test_the_schedule_is_megatrons(style, wsd_style):
    wsd_decay = 30 if style == "WSD" else None
    ours = LRSchedule(LR, MIN_LR, style, WARMUP, DECAY, wsd_decay, wsd_style or "exponential")
    theirs = megatron(style, wsd_decay, wsd_style)
    # warm-up: our step s runs at Megatron's s + 1 (its first step has a rate of 0 and learns nothing)
    assert [ours(s) for s in range(WARMUP)] == pytest.approx(theirs[1 : WARMUP + 1], rel=1e-12)
    assert [ours(s) for s in range(WARMUP, DECAY + 20)] == pytest.approx(theirs[WARMUP:], rel=1e-12)
    assert theirs[0] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(style="WSD", wsd_decay_iters=None), "needs --lr-wsd-decay-iters"),
        (dict(style="WSD", wsd_decay_iters=95), "needs --lr-wsd-decay-iters in 1..90"),
        (dict(style="WSD", wsd_decay_iters=10, wsd_style="step"), "unknown --lr-wsd-decay-style"),
        (dict(style="exponential"), "unknown --lr-decay-style"),
    ],
)
def test_a_schedule_that_cannot_run_is_refused(kwargs, message):
    style = kwargs.pop("style")
    with pytest.raises(ValueError, match=message):
        LRSchedule(LR, MIN_LR, style, WARMUP, DECAY, **kwargs)


def megatron_batch_sizes(gbs, rampup, unit, consumed_points):
    """megatron-core's ramp-up calculator: the global batch at each number of consumed samples."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.num_microbatches_calculator import (
            RampupBatchsizeNumMicroBatchesCalculator,
        )
    calc = RampupBatchsizeNumMicroBatchesCalculator(gbs, unit, 1, False, 0, *rampup)
    sizes = []
    for consumed in consumed_points:
        calc.update(consumed, consistency_check=True)
        sizes.append(calc.get_current_global_batch_size())
    return sizes


@pytest.mark.parametrize(
    "gbs, rampup, unit", [(8, (2, 2, 12), 2), (96, (16, 16, 1000), 8), (64, (32, 32, 7), 4)]
)
def test_the_batch_ramp_up_is_megatrons(gbs, rampup, unit):
    from megatron_glm.training.batch_schedule import BatchSchedule

    ours = BatchSchedule(gbs, unit, rampup)
    assert ours.problems() == []
    points = list(range(0, rampup[2] + 3 * gbs))
    assert [ours.size_at(c) for c in points] == megatron_batch_sizes(gbs, rampup, unit, points)
    consumed = [ours.consumed_before(s) for s in range(60)]
    assert all(b - a == ours.size_at(a) for a, b in zip(consumed, consumed[1:]))


def test_the_steps_in_train_samples_are_megatrons():
    from megatron_glm.training.batch_schedule import BatchSchedule

    # by hand: sizes 2, 2, 4, 6 while consumed <= 12 (0, 2, 4, 8 -> 14), then (46 - 14) // 8 = 4 whole batches
    ramp = BatchSchedule(8, 2, (2, 2, 12))
    assert (
        ramp.iterations_for(46) == 8
        and ramp.consumed_before(8) == 46
        and ramp.iterations_for(45) == 7
    )
    assert BatchSchedule(8, 2).iterations_for(46) == 5  # constant: whole batches only
    # --train-samples inside the ramp (2, 2, 24 to 8): Megatron runs the whole ramp, sizes 2, 2, 2, 2, 4, 4, 6, 6
    # reach 28 in 8 steps, then adds (10 - 28) // 8 = -3: 5 steps (12 samples); for 1 sample, 8 - 4 = 4 steps
    ramp = BatchSchedule(8, 2, (2, 2, 24))
    assert (
        ramp.iterations_for(10) == 5
        and ramp.consumed_before(5) == 12
        and ramp.iterations_for(1) == 4
    )
    assert BatchSchedule(8, 2, (3, 2, 12)).problems() and BatchSchedule(8, 2, (2, 4, 12)).problems()
    assert BatchSchedule(8, 2, (8, 2, 12)).problems()


def test_sample_based_lr_lengths_are_megatrons_under_a_ramp_up():
    from megatron_glm.training.batch_schedule import BatchSchedule

    batches = BatchSchedule(8, 2, (2, 2, 12))
    warmup, decay = batches.consumed_before(4), 300  # a warm-up that ends with a step
    ours = LRSchedule(LR, MIN_LR, "cosine", warmup, decay, consumed_before=batches.consumed_before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = OptimizerParamScheduler(
        optimizer, 0.0, LR, MIN_LR, warmup, decay, "cosine", 0.0, 0.0, decay, "constant"
    )
    theirs = []
    for step in range(45):  # Megatron's loop advances the schedule by each step's batch
        theirs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(batches.size_at(batches.consumed_before(step)))
    # warm-up: a step earlier
    assert [ours(s) for s in range(4)] == pytest.approx(theirs[1:5], rel=1e-12)
    assert [ours(s) for s in range(4, 44)] == pytest.approx(theirs[4:44], rel=1e-12)
