"""Generic tensor-parallel pieces a model's plan (``model/parallelize.py``) builds from.

- ``shard_tensor``/``unshard_tensors``: a parameter's slice for one rank, and the inverse. A
  split is ``(dim, stride)``: ``stride`` parts (e.g. Q, K, V) are each split ``world`` ways and
  rank r keeps ``[part_0[r]; part_1[r]; ...]``;
- ``materialize``: real storage for a module built on the meta device, parameter by parameter,
  keeping the marks the parallel layers put on them;
- output, dropout and sequence-parallel modules that sit between the model's own layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.parallel.cross_entropy import (
    vocab_parallel_cross_entropy,
    vocab_parallel_is_argmax,
)
from megatron_glm.parallel.layers import install_sequence_parallel_hook
from megatron_glm.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron_glm.parallel.random import get_rng_tracker


def shard_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    # a copy: cat always is
    return torch.cat([part.chunk(world, dim)[rank] for part in full.chunk(stride, dim)], dim)


def unsharded_shape(shape, spec: tuple[int, int] | None, world: int) -> tuple[int, ...]:
    """The whole tensor's shape from one of its ``world`` shards (``spec``: ``partition_of``'s dim and stride)."""
    shape = list(shape)
    if spec is not None:
        shape[spec[0]] *= world
    return tuple(shape)


def sharded_shape(shape, spec: tuple[int, int] | None, world: int) -> tuple[int, ...]:
    """One of ``world`` shards' shape, from the whole tensor's (the inverse of ``unsharded_shape``)."""
    shape = list(shape)
    if spec is not None:
        shape[spec[0]] //= world
    return tuple(shape)


def unshard_tensors(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    pieces = [s.chunk(stride, dim) for s in shards]
    return torch.cat([torch.cat([p[k] for p in pieces], dim) for k in range(stride)], dim)


def materialize(module: nn.Module, make, after=None) -> None:
    """Replace every meta parameter of ``module`` by ``make(name, meta_param)``, one at a time.

    ``make`` returns the tensor (this rank's shard: initialised, or read from a checkpoint); only
    one full tensor needs to exist at once. The new parameter keeps the old one's attributes
    (``tensor_model_parallel``, ``sequence_parallel``, ...) and gets the hooks they call for.
    ``after(owner)`` runs once a submodule's parameters are real (ZeRO-3 partitions them there).
    """
    for prefix, owner in module.named_modules():
        made = False
        for key, meta in list(owner._parameters.items()):
            if meta is None or not meta.is_meta:
                continue
            name = f"{prefix}.{key}" if prefix else key
            value = make(name, meta)
            if tuple(value.shape) != tuple(meta.shape):
                raise ValueError(
                    f"{name}: got shape {tuple(value.shape)}, this rank's model has {tuple(meta.shape)}"
                )
            param = nn.Parameter(value, requires_grad=meta.requires_grad)
            param.__dict__.update(meta.__dict__)
            if getattr(param, "sequence_parallel", False):
                install_sequence_parallel_hook(param)
            owner._parameters[key] = param
            made = True
        if made and after is not None:
            after(owner)


class VocabParallelOutput(nn.Module):
    """Tied logits on this rank's vocabulary range, and the vocab-parallel cross entropy."""

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def forward(self, h, weight):
        if self.sequence_parallel:
            h = gather_from_sequence_parallel_region(h)
        else:
            h = copy_to_tensor_model_parallel_region(h)
        return F.linear(h, weight)

    @staticmethod
    def cross_entropy(logits, labels):
        return vocab_parallel_cross_entropy(logits, labels)

    @staticmethod
    def is_argmax(logits, labels):
        return vocab_parallel_is_argmax(logits, labels)


class ForkedDropout(nn.Dropout):
    """Dropout on activations that differ across TP ranks (sequence-parallel chunks): the TP-rank RNG."""

    def forward(self, x):
        with get_rng_tracker().fork():
            return super().forward(x)


class ScatterToSequenceParallel(nn.Module):
    """Embedding output -> this rank's sequence chunk, then its dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.dropout = ForkedDropout(p)

    def forward(self, x):
        return self.dropout(scatter_to_sequence_parallel_region(x))
