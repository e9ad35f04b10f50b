"""Autograd communication across the tensor-parallel group (Megatron's mappings).

Each mapping is a pair of collectives, one for the forward pass and its adjoint for the
backward pass. Sequence parallelism splits activations along the sequence dimension, which
is dim 1 in this project's ``[B, S, H]`` layout. With one tensor-parallel rank each mapping
returns its input untouched and no collective runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.parallel import state

SEQ_DIM = 1


def _group():
    return state.get_tensor_model_parallel_group()


def _world() -> int:
    return state.get_tensor_model_parallel_world_size()


def _all_reduce(x):
    if _world() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=_group())
    return x


def _split(x, dim):
    if _world() == 1:
        return x
    return x.chunk(_world(), dim=dim)[state.get_tensor_model_parallel_rank()].contiguous()


def _gather(x, dim):
    if _world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(parts, x.contiguous(), group=_group())
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x, dim):
    if _world() == 1:
        return x
    parts = [p.contiguous() for p in x.chunk(_world(), dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=_group())
    return out


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone())


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, g):
        return g


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _split(x, dim)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _gather(x, dim)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim), None


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence; backward reduce-scatters (the input feeds a TP-split matmul)."""

    @staticmethod
    def forward(ctx, x):
        return _gather(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, SEQ_DIM)


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, SEQ_DIM)


def copy_to_tensor_model_parallel_region(x):
    """Identity forward, all-reduce backward: the input of a column-parallel layer."""
    return x if _world() == 1 else _Copy.apply(x)


def reduce_from_tensor_model_parallel_region(x):
    """All-reduce forward, identity backward: the output of a row-parallel layer."""
    return x if _world() == 1 else _Reduce.apply(x)


def scatter_to_tensor_model_parallel_region(x, dim: int = -1):
    return x if _world() == 1 else _Scatter.apply(x, dim)


def gather_from_tensor_model_parallel_region(x, dim: int = -1):
    return x if _world() == 1 else _Gather.apply(x, dim)


def scatter_to_sequence_parallel_region(x):
    """Keep this rank's sequence chunk; backward all-gathers."""
    return x if _world() == 1 else _Scatter.apply(x, SEQ_DIM)


def gather_from_sequence_parallel_region(x, tensor_parallel_output_grad: bool = True):
    """All-gather the sequence. Backward reduce-scatters when the consumer is TP-split, else splits."""
    if _world() == 1:
        return x
    return _GatherSeq.apply(x) if tensor_parallel_output_grad else _Gather.apply(x, SEQ_DIM)


def reduce_scatter_to_sequence_parallel_region(x):
    """Sum partial outputs and keep this rank's sequence chunk; backward all-gathers."""
    return x if _world() == 1 else _ReduceScatterSeq.apply(x)
