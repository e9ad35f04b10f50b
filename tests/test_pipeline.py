"""Pipeline schedules on their own: real processes, a toy layer stack, gradients against one process."""

import re

import pytest
import torch

from megatron_glm.parallel.pipeline import partition_layers
from tests.helpers import spawn

LAYERS, WIDTH, MICRO = 8, 6, 3


def full_stack():
    torch.manual_seed(0)
    return torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))


def micro_batch(m):
    g = torch.Generator().manual_seed(100 + m)
    return torch.randn(MICRO, WIDTH, generator=g), torch.randn(MICRO, WIDTH, generator=g)


def loss_of(out, target):
    return ((out - target) ** 2).mean()


class Chunk(torch.nn.Module):
    def __init__(self, layers, first, last):
        super().__init__()
        self.layers, self.first, self.last = torch.nn.ModuleList(layers), first, last

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def schedule_worker(rank, world, vpp, num_micro, forward_only):
    from megatron_glm.parallel import state
    from megatron_glm.parallel.pipeline import backward_from, get_schedule

    state.initialize_model_parallel(pp=world)
    stack = full_stack()
    ranges = partition_layers(LAYERS, world, vpp)[rank]
    chunks = [
        Chunk([stack[i] for i in r], rank == 0 and c == 0, rank == world - 1 and c == vpp - 1)
        for c, r in enumerate(ranges)
    ]
    losses, order = {}, []

    def forward_step(chunk, m, x):
        order.append(("F", chunks.index(chunk), m))
        data, target = micro_batch(m)
        out = chunk(data if chunk.first else x)
        if chunk.last:
            loss = loss_of(out, target) / num_micro
            losses[m] = float(loss.detach())
            return loss
        return out

    def backward_step(chunk, x, out, grad):
        order.append(("B", chunks.index(chunk)))
        if grad is None:
            out.backward()
        else:
            backward_from(out, grad)
        return x.grad if x is not None else None

    get_schedule(world, vpp)(
        forward_step,
        backward_step,
        chunks,
        num_micro,
        shape=(MICRO, WIDTH),
        dtype=torch.float32,
        forward_only=forward_only,
    )
    grads = {i: stack[i].weight.grad for r in ranges for i in r}
    return {"losses": losses, "grads": grads, "order": order}


def reference(num_micro):
    stack = full_stack()
    losses = {}
    for m in range(num_micro):
        data, target = micro_batch(m)
        x = data
        for layer in stack:
            x = torch.tanh(layer(x))
        loss = loss_of(x, target) / num_micro
        losses[m] = float(loss.detach())
        loss.backward()
    return losses, {i: stack[i].weight.grad for i in range(LAYERS)}


@pytest.mark.parametrize(
    "world, vpp, num_micro", [(2, 1, 5), (4, 1, 6), (2, 2, 4), (2, 2, 2), (4, 2, 8), (2, 4, 6)]
)
@pytest.mark.slow
def test_schedules_equal_one_process(tmp_path, world, vpp, num_micro):
    results = spawn(schedule_worker, world, tmp_path, vpp, num_micro, False)
    ref_losses, ref_grads = reference(num_micro)
    last = results[-1]["losses"]
    assert last.keys() == ref_losses.keys()
    for m in ref_losses:
        assert last[m] == pytest.approx(ref_losses[m], rel=1e-6)
    for r in results:
        for i, g in r["grads"].items():
            torch.testing.assert_close(g, ref_grads[i], rtol=1e-5, atol=1e-7)
    assert sum(1 for op in results[0]["order"] if op[0] == "B") == num_micro * vpp


@pytest.mark.slow
def test_1f1b_keeps_at_most_pp_minus_rank_in_flight(tmp_path):
    results = spawn(schedule_worker, 4, tmp_path, 1, 8, False)
    for rank, r in enumerate(results):
        alive, peak = 0, 0
        for op in r["order"]:
            alive += 1 if op[0] == "F" else -1
            peak = max(peak, alive)
        assert peak == 4 - rank, (rank, peak)


@pytest.mark.slow
def test_forward_only(tmp_path):
    results = spawn(schedule_worker, 2, tmp_path, 2, 4, True)
    ref_losses, _ = reference(4)
    assert results[-1]["losses"] == pytest.approx(ref_losses)
    assert all(op[0] == "F" for r in results for op in r["order"])


def test_partitioning():
    assert partition_layers(8, 2) == [[range(0, 4)], [range(4, 8)]]
    assert partition_layers(8, 2, 2) == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]
    assert partition_layers(6, 2, explicit=[4, 2]) == [[range(0, 4)], [range(4, 6)]]
    with pytest.raises(ValueError, match="not divisible by pipeline stages 2 x virtual stages 2"):
        partition_layers(6, 2, 2)
    with pytest.raises(ValueError, match="--pipeline-layers"):
        partition_layers(6, 2, explicit=[3, 2])


@pytest.mark.parametrize(
    "layers, pp, vpp, flags, counts",
    [
        # GLM-130B as published: 70 layers on 8 stages, the first and last holding fewer
        (70, 8, 1, dict(first=8, last=8), [8, 9, 9, 9, 9, 9, 9, 8]),
        (70, 8, 1, dict(embedding=True, loss=True), [8, 9, 9, 9, 9, 9, 9, 8]),
        (7, 3, 1, dict(first=2, last=2), [2, 3, 2]),
        (7, 3, 1, dict(first=1), [1, 3, 3]),
        (7, 3, 1, dict(last=3), [2, 2, 3]),
        (8, 3, 1, dict(embedding=True), [2, 3, 3]),
        (8, 3, 1, dict(loss=True), [3, 3, 2]),
        # interleaved: a rank's layers split over its chunks; the embedding is in the first chunk of rank 0
        (12, 2, 2, dict(first=4, last=8), [2, 4, 2, 4]),
        (10, 2, 2, dict(embedding=True, loss=True), [2, 3, 3, 2]),
        (8, 2, 1, dict(), None),
    ],
)
def test_megatrons_uneven_splits(layers, pp, vpp, flags, counts):
    from megatron_glm.parallel.pipeline import stage_layer_counts

    assert stage_layer_counts(layers, pp, vpp, **flags) == counts
    if counts:  # and the ranks' chunks cover every layer once, in order
        chunks = partition_layers(layers, pp, vpp, counts)
        assert sorted(i for rank in chunks for chunk in rank for i in chunk) == list(range(layers))


@pytest.mark.parametrize(
    "layers, pp, vpp, flags, message",
    [
        (8, 4, 1, dict(first=2, last=1), "leaves 5 layers for the 2 stage(s) between"),
        (7, 3, 1, dict(first=3, last=4), "leaves 0 layers for the 1 stage(s) between"),
        (7, 2, 1, dict(first=3, last=3), "leaves 1 layers for the 0 stage(s) between"),
        (7, 3, 1, dict(first=0), "each given stage needs at least one layer"),
        (7, 3, 1, dict(first=2, embedding=True), "pass one"),
        (7, 3, 1, dict(embedding=True), "--num-layers + the embedding = 8 does not split evenly"),
        (
            12,
            2,
            2,
            dict(first=3),
            "pipeline stage 0 gets 3 layers, not divisible into 2 virtual stages",
        ),
        (7, 1, 1, dict(first=7), "need --pipeline-model-parallel-size > 1"),
    ],
)
def test_an_uneven_split_that_cannot_be_made_says_why(layers, pp, vpp, flags, message):
    from megatron_glm.parallel.pipeline import stage_layer_counts

    with pytest.raises(ValueError, match=re.escape(message)):
        stage_layer_counts(layers, pp, vpp, **flags)
