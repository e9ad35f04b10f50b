"""GLM's parallel plan: which layers split how, the pipeline chunks, and building a rank's shard.

The model code is written once with plain layers. ``apply_tp`` swaps in the parallel layers,
sliced by these rules (``partition_of``, shared with checkpoints and conversion):

- ``query_key_value``: rows, per part: rank r holds ``[Q_r; K_r; V_r]`` (its heads);
- ``dense_h_to_4h``: rows (per half with GeGLU); ``word_embeddings``: rows (vocabulary ranges);
- ``attention.dense`` and ``dense_4h_to_h``: columns;
- everything else (LayerNorms, row-parallel biases, position tables) is replicated.

``build_rank_model`` builds only this rank's pipeline chunks, on the meta device, applies the
plan there, and then gives each parameter its storage one at a time: initialised from the full
tensor's own generator (``init_parameter``) and sliced, or read from this rank's converted
shard. So a rank never holds more than its shard plus one full tensor, and its weights are
bitwise the slice of what a one-process run with the same seed starts from.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
from torch import nn

from megatron_glm.config import ModelConfig
from megatron_glm.model.glm import CoreAttention, GLMModel, init_parameter
from megatron_glm.parallel import state
from megatron_glm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_sequence_parallel,
)
from megatron_glm.parallel.pipeline import partition_layers
from megatron_glm.parallel.random import get_rng_tracker
from megatron_glm.parallel.recompute import Checkpointed, Recompute, check_recompute
from megatron_glm.parallel.tensor_parallel import (
    ForkedDropout,
    ScatterToSequenceParallel,
    VocabParallelOutput,
    materialize,
    shard_tensor,
    unshard_tensors,
)


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


@dataclass(frozen=True)
class RankLayout:
    """Where this rank sits: its tensor- and pipeline-parallel coordinates, and the chunking."""

    tp_rank: int = 0
    tp: int = 1
    pp_rank: int = 0
    pp: int = 1
    vpp: int = 1
    pipeline_layers: tuple[int, ...] | None = None  # explicit layer counts per virtual stage

    @classmethod
    def from_state(cls, vpp: int = 1, pipeline_layers=None) -> "RankLayout":
        return cls(
            state.get_tensor_model_parallel_rank(),
            state.get_tensor_model_parallel_world_size(),
            state.get_pipeline_model_parallel_rank(),
            state.get_pipeline_model_parallel_world_size(),
            vpp,
            tuple(pipeline_layers) if pipeline_layers else None,
        )

    def chunk_layers(self, num_layers: int) -> list[range]:
        explicit = list(self.pipeline_layers) if self.pipeline_layers else None
        return partition_layers(num_layers, self.pp, self.vpp, explicit)[self.pp_rank]


def apply_tp(
    model: GLMModel,
    sequence_parallel: bool = False,
    tp_rank: int | None = None,
    tp: int | None = None,
):
    """Shard ``model`` (a whole GLMModel or a pipeline chunk) for one TP rank, in place; TP=1 changes nothing.

    Works on real weights (they are sliced) and on the meta device (only shapes change).
    """
    tp = state.get_tensor_model_parallel_world_size() if tp is None else tp
    if tp == 1:
        return model
    rank = state.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    cfg = model.cfg

    def split(name, tensor):
        dim, stride = partition_of(name, cfg.geglu)
        return shard_tensor(tensor.detach(), dim, stride, rank, tp)

    def column(name, linear):
        return ColumnParallelLinear(
            split(name + ".weight", linear.weight),
            split(name + ".bias", linear.bias),
            sequence_parallel,
        )

    def row(name, linear):
        return RowParallelLinear(
            split(name + ".weight", linear.weight), linear.bias.detach().clone(), sequence_parallel
        )

    for layer in model.transformer.layers:
        att, mlp = layer.attention, layer.mlp
        att.query_key_value = column("attention.query_key_value", att.query_key_value)
        att.dense = row("attention.dense", att.dense)
        mlp.dense_h_to_4h = column("mlp.dense_h_to_4h", mlp.dense_h_to_4h)
        mlp.dense_4h_to_h = row("mlp.dense_4h_to_h", mlp.dense_4h_to_h)
        if sequence_parallel:
            layer.dropout = ForkedDropout(layer.dropout.p)
            for p in (
                *layer.input_layernorm.parameters(),
                *layer.post_attention_layernorm.parameters(),
            ):
                mark_sequence_parallel(p)
    for core in (m for m in model.modules() if isinstance(m, CoreAttention)):
        core.rng_fork = get_rng_tracker().fork  # dropout on this rank's heads
    if model.pre_process:
        vocab_shard = split("word_embeddings.weight", model.word_embeddings.weight)
        model.word_embeddings = VocabParallelEmbedding(vocab_shard, rank * vocab_shard.shape[0])
        if sequence_parallel:
            model.transformer.embedding_dropout = ScatterToSequenceParallel(
                model.transformer.embedding_dropout.p
            )
    if model.post_process:
        model.output_layer = VocabParallelOutput(sequence_parallel)
        if sequence_parallel:
            for p in model.transformer.final_layernorm.parameters():
                mark_sequence_parallel(p)
    model.tensor_parallel, model.sequence_parallel = tp, sequence_parallel
    return model


def apply_ac(
    model: GLMModel, granularity: str | None, method: str = "uniform", num_layers: int = 1
):
    """Activation recomputation by Megatron's flags (``parallel/recompute.py``); None leaves ``model`` as it is."""
    check_recompute(granularity, method, num_layers)
    if granularity == "selective":
        for layer in model.transformer.layers:
            layer.attention.core_attention = Checkpointed(layer.attention.core_attention)
    elif granularity == "full":
        model.transformer.recompute = Recompute(method, num_layers)
    return model


def build_chunks(cfg: ModelConfig, layout: RankLayout) -> list[GLMModel]:
    """This rank's pipeline chunks on the meta device: chunk ``c`` runs virtual stage ``c * pp + pp_rank``."""
    ranges = layout.chunk_layers(cfg.num_layers)
    last = len(ranges) - 1
    with torch.device("meta"):
        return [
            GLMModel(
                cfg,
                layers,
                pre_process=layout.pp_rank == 0 and c == 0,
                post_process=layout.pp_rank == layout.pp - 1 and c == last,
            )
            for c, layers in enumerate(ranges)
        ]


def initialize_shard(chunk: GLMModel, layout: RankLayout, seed: int, after=None) -> None:
    """Real weights for a meta chunk: each full tensor initialised by its generator, then sliced.

    A full tensor that is only sliced lives in its own anonymous mapping, handed back to the
    system at once: allocated from the heap between the slices, the freed tensors left holes
    that kept up to ~50% of the shard again resident.
    """

    def make(name, meta):
        full_name = chunk.full_name(name)
        spec = partition_of(full_name, chunk.cfg.geglu) if layout.tp > 1 else None
        if (
            not spec and after is not None
        ):  # to be partitioned at once (ZeRO-3): its own mapping, as below
            buffer = torch.frombuffer(mmap.mmap(-1, 4 * math.prod(meta.shape)), dtype=torch.float32)
            return init_parameter(
                chunk.cfg, full_name, meta.shape, seed, out=buffer.view(meta.shape)
            )
        if not spec:
            return init_parameter(chunk.cfg, full_name, meta.shape, seed)
        shape = list(meta.shape)
        shape[spec[0]] *= layout.tp
        with mmap.mmap(-1, 4 * math.prod(shape)) as scratch:
            full = init_parameter(
                chunk.cfg,
                full_name,
                shape,
                seed,
                out=torch.frombuffer(scratch, dtype=torch.float32).view(shape),
            )
            shard = shard_tensor(full, *spec, layout.tp_rank, layout.tp)
            del full  # the mapping closes only once nothing views it
        return shard

    materialize(chunk, make, after)


def load_shard(chunk: nn.Module, weights: dict[str, torch.Tensor], where: str, after=None) -> None:
    """Real weights for a meta module from its own state dict (a converted checkpoint's rank file), taken as is."""
    missing = []

    def make(name, meta):
        if name not in weights:
            missing.append(name)
            return torch.empty(meta.shape)
        value = weights.pop(name)
        if value.dtype != meta.dtype:
            value = value.to(meta.dtype)
        return value

    try:
        materialize(chunk, make, after)
    except ValueError as e:  # a tensor of another shape
        raise ValueError(f"{where} does not fit this rank's model: {e}") from None
    if missing or weights:
        raise ValueError(
            f"{where} does not fit this rank's model: missing {missing[:6]}, "
            f"unexpected {sorted(weights)[:6]}"
        )


def build_rank_model(
    cfg: ModelConfig,
    layout: RankLayout,
    seed: int,
    sequence_parallel: bool = False,
    recompute: tuple = (None,),
    attention_impl: str = "auto",
    weights=None,
    layernorm_impl: str = "torch",
    partition=None,
) -> list[GLMModel]:
    """This rank's chunks with real weights: initialised from ``seed``, or ``weights(chunks)`` (this rank's
    state dict for the meta chunks, named as one module of them: a ModuleList's ``{c}.`` prefixes when several).

    ``partition(module)`` (ZeRO-3) runs as each submodule's parameters become real, so that only
    one full tensor exists at a time and the rank never holds its whole shard."""
    chunks = build_chunks(cfg, layout)
    for chunk in chunks:
        chunk.set_attention_impl(attention_impl)
        apply_tp(chunk, sequence_parallel, layout.tp_rank, layout.tp)
        apply_ac(chunk, *recompute)
        apply_layernorm_impl(chunk, layernorm_impl)  # on the meta model: its weights are made below
    if weights is None:
        for chunk in chunks:
            initialize_shard(chunk, layout, seed, partition)
    else:
        state_dict, where = weights(chunks)
        module = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
        load_shard(module, dict(state_dict), where, partition)
    return chunks


def apply_layernorm_impl(model, impl: str) -> None:
    """``--layernorm-impl apex``: every LayerNorm becomes apex's FusedLayerNorm holding the same parameter
    objects (their names, values and parallel attributes such as ``sequence_parallel``; on a meta model, made
    real later by their names)."""
    if impl == "torch":
        return
    from apex.normalization import FusedLayerNorm

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.LayerNorm:
                with torch.device("meta"):
                    fused = FusedLayerNorm(child.normalized_shape, eps=child.eps)
                fused.weight, fused.bias = child.weight, child.bias
                setattr(parent, name, fused)


def count_parameters(cfg: ModelConfig, tp: int) -> int:
    """Parameters of one TP rank's share of the whole model (all layers), counted on the meta device."""
    with torch.device("meta"):
        model = apply_tp(GLMModel(cfg), tp_rank=0, tp=tp)
    return sum(p.numel() for p in model.parameters())


def gather_full_state(model) -> dict[str, torch.Tensor]:
    """The single-process state dict of a TP-sharded model (every rank gets it): for tests and export."""
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
