"""``apply_tp``: turn a GLM model into this rank's tensor-parallel shard, in place.

The model code is written once with plain layers; this swaps in the parallel layers with
the slices of the full weights that belong to this rank, so a sharded model starts exactly
where the single-process one does. The slicing rules (``partition_of``, ``shard_tensor``,
``unshard_tensors``) are shared with checkpoint conversion:

- ``query_key_value``: rows, per part: rank r holds ``[Q_r; K_r; V_r]`` (its heads);
- ``dense_h_to_4h``: rows (per half with GeGLU); ``word_embeddings``: rows (vocabulary ranges);
- ``attention.dense`` and ``dense_4h_to_h``: columns;
- everything else (LayerNorms, row-parallel biases, position tables) is replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.parallel import state
from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_glm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_sequence_parallel,
)
from megatron_glm.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron_glm.parallel.random import get_rng_tracker


def partition_of(name: str, geglu: bool = False) -> tuple[int, int] | None:
    """``(dim, stride)`` a parameter is split along, or None when it is replicated."""
    if name.endswith(("query_key_value.weight", "query_key_value.bias")):
        return 0, 3
    if name.endswith(("dense_h_to_4h.weight", "dense_h_to_4h.bias")):
        return 0, 2 if geglu else 1
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        return 1, 1
    if name.endswith("word_embeddings.weight"):
        return 0, 1
    return None


def shard_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    return torch.cat([part.chunk(world, dim)[rank] for part in full.chunk(stride, dim)], dim).clone()


def unshard_tensors(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    pieces = [s.chunk(stride, dim) for s in shards]
    return torch.cat([torch.cat([p[k] for p in pieces], dim) for k in range(stride)], dim)


class VocabParallelOutput(nn.Module):
    """Tied logits on this rank's vocabulary range, and the vocab-parallel cross entropy."""

    def __init__(self, sequence_parallel: bool):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def forward(self, h, weight):
        h = gather_from_sequence_parallel_region(h) if self.sequence_parallel else copy_to_tensor_model_parallel_region(h)
        return F.linear(h, weight)

    @staticmethod
    def cross_entropy(logits, labels):
        return vocab_parallel_cross_entropy(logits, labels)


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


def apply_tp(model, sequence_parallel: bool = False):
    """Shard ``model`` (a full GLMModel) for this rank of the tensor-parallel group; TP=1 changes nothing."""
    tp = state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return model
    rank, cfg = state.get_tensor_model_parallel_rank(), model.cfg
    state.check_layout(tp * state.get_pipeline_model_parallel_world_size(), tp,
                       state.get_pipeline_model_parallel_world_size(), cfg.num_attention_heads, cfg.hidden_size,
                       cfg.vocab_size)

    def split(name, tensor):
        dim, stride = partition_of(name, cfg.geglu)
        return shard_tensor(tensor.detach(), dim, stride, rank, tp)

    def column(prefix, linear):
        return ColumnParallelLinear(split(prefix + ".weight", linear.weight), split(prefix + ".bias", linear.bias),
                                    sequence_parallel)

    def row(prefix, linear):
        return RowParallelLinear(split(prefix + ".weight", linear.weight), linear.bias.detach().clone(),
                                 sequence_parallel)

    for i, layer in enumerate(model.transformer.layers):
        prefix = f"transformer.layers.{i}"
        att, mlp = layer.attention, layer.mlp
        att.query_key_value = column(prefix + ".attention.query_key_value", att.query_key_value)
        att.dense = row(prefix + ".attention.dense", att.dense)
        att.rng_fork = get_rng_tracker().fork  # dropout on this rank's heads
        mlp.dense_h_to_4h = column(prefix + ".mlp.dense_h_to_4h", mlp.dense_h_to_4h)
        mlp.dense_4h_to_h = row(prefix + ".mlp.dense_4h_to_h", mlp.dense_4h_to_h)
        if sequence_parallel:
            layer.dropout = ForkedDropout(layer.dropout.p)
            for p in (*layer.input_layernorm.parameters(), *layer.post_attention_layernorm.parameters()):
                mark_sequence_parallel(p)
    vocab_shard = split("word_embeddings.weight", model.word_embeddings.weight)
    model.word_embeddings = VocabParallelEmbedding(vocab_shard, rank * vocab_shard.shape[0])
    model.output_layer = VocabParallelOutput(sequence_parallel)
    if sequence_parallel:
        model.transformer.embedding_dropout = ScatterToSequenceParallel(model.transformer.embedding_dropout.p)
        for p in model.transformer.final_layernorm.parameters():
            mark_sequence_parallel(p)
    model.tensor_parallel, model.sequence_parallel = tp, sequence_parallel
    return model


def gather_full_state(model) -> dict[str, torch.Tensor]:
    """The single-process state dict of a sharded model (every rank gets it): for tests and export."""
    import torch.distributed as dist

    tp = state.get_tensor_model_parallel_world_size()
    out = {}
    for name, tensor in model.state_dict().items():
        spec = partition_of(name, model.cfg.geglu)
        if tp == 1 or spec is None:
            out[name] = tensor
            continue
        parts = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(parts, tensor.contiguous(), group=state.get_tensor_model_parallel_group())
        out[name] = unshard_tensors(parts, *spec)
    return out
