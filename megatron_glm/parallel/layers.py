"""Tensor-parallel layers (Megatron's names): each holds its shard and does its own communication.

Sharded parameters carry ``tensor_model_parallel = True`` (Megatron's mark) and
``model_parallel = True`` (DeepSpeed's, so gradient clipping counts them on every rank and
replicated ones once). Parameters that see only a sequence chunk under sequence parallelism
carry ``sequence_parallel = True``; their gradients are summed over the TP group by a hook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_glm.parallel import state
from megatron_glm.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def mark_tensor_parallel(p: nn.Parameter, partition_dim: int) -> nn.Parameter:
    p.tensor_model_parallel, p.model_parallel, p.partition_dim = True, True, partition_dim
    return p


def mark_sequence_parallel(p: nn.Parameter) -> None:
    """Sum this replicated parameter's gradient over the TP group (each rank saw one sequence chunk).

    On the meta device only the mark is set; ``materialize`` installs the hook on the real parameter.
    """
    if getattr(p, "sequence_parallel", False):
        return
    p.sequence_parallel = True
    if not p.is_meta:
        install_sequence_parallel_hook(p)


def install_sequence_parallel_hook(p: nn.Parameter) -> None:
    def all_reduce(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=state.get_tensor_model_parallel_group())
        return grad

    p.register_hook(all_reduce)


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its output rows; the output stays split."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, sequence_parallel: bool = False
    ):
        super().__init__()
        self.weight = mark_tensor_parallel(nn.Parameter(weight), 0)
        self.bias = mark_tensor_parallel(nn.Parameter(bias), 0) if bias is not None else None
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x)
        else:
            x = copy_to_tensor_model_parallel_region(x)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split along its input columns; partial outputs are summed."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, sequence_parallel: bool = False
    ):
        super().__init__()
        self.weight = mark_tensor_parallel(nn.Parameter(weight), 1)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.sequence_parallel = sequence_parallel
        if sequence_parallel and self.bias is not None:
            mark_sequence_parallel(self.bias)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = reduce_from_tensor_model_parallel_region(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range; ids outside the local range contribute zero."""

    def __init__(self, weight: torch.Tensor, vocab_start: int):
        super().__init__()
        self.weight = mark_tensor_parallel(nn.Parameter(weight), 0)
        self.vocab_start, self.vocab_end = vocab_start, vocab_start + weight.shape[0]

    @property
    def num_embeddings(self) -> int:
        return self.vocab_end - self.vocab_start

    def forward(self, ids):
        if state.get_tensor_model_parallel_world_size() == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tensor_model_parallel_region(out)
