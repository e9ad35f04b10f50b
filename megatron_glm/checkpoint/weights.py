"""A checkpoint's weights without DeepSpeed: one rank's file, or every shard merged for inference."""

from __future__ import annotations

import os

from megatron_glm import serialization
from megatron_glm.checkpoint.format import (
    CheckpointError,
    locate,
    model_file,
    read_meta,
    settings_of,
)
from megatron_glm.model.parallelize import partition_of
from megatron_glm.parallel.tensor_parallel import unshard_tensors


def read_weights_only(
    load_dir: str, tag: str, pp_rank: int, tp_rank: int, tp: int, trust: bool = False
) -> tuple[dict, str]:
    """This rank's state dict from a weights-only (glm-convert) checkpoint, and the file it came from."""
    path = model_file(os.path.join(load_dir, tag), pp_rank, tp_rank, tp)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: the converted checkpoint is incomplete")
    return _module_of(serialization.load(path, trust=trust), path), path


def _module_of(state, path: str) -> dict:
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise CheckpointError(
            f"{path} holds no model state dict under 'module': not a megatron-glm model file"
        )
    return state["module"]


def load_model_weights(
    load_dir: str, tag: str | None = None, trust: bool = False
) -> tuple[dict, dict]:
    """(state dict, meta) of a checkpoint for inference, without DeepSpeed or an optimizer."""
    if tag is None:
        load_dir, tag = locate(load_dir)
    meta = read_meta(load_dir, tag)
    if settings_of(meta).parallel.zero_stage == 3:
        raise CheckpointError(
            f"{load_dir}/{tag} holds ZeRO-3 partitions, not whole weights: consolidate them first "
            "(glm-convert zero-to-fp32)"
        )
    folder, tp = os.path.join(load_dir, tag), meta.get("tensor_model_parallel_size", 1)

    def read(p, t):
        path = model_file(folder, p, t, tp)
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        return _module_of(serialization.load(path, trust=trust), path)

    state = merge_model_shards(read, meta)
    serialization.check_finite(state.items(), os.path.join(load_dir, tag))
    return state, meta


def merge_model_shards(read_shard, meta: dict) -> dict:
    """One model's state dict (single-process names) from the shards ``read_shard(pp_rank, tp_rank)``."""
    tp, pp = meta.get("tensor_model_parallel_size", 1), meta.get("pipeline_model_parallel_size", 1)
    geglu = meta["model"].get("geglu", False)
    merged = {}
    for p in range(pp):  # DeepSpeed names files by model-parallel rank = pp_rank * tp + tp_rank
        shards = [read_shard(p, t) for t in range(tp)]
        ranges = meta["pipeline_layers"][p] if pp > 1 else None
        for name, tensor in shards[0].items():
            spec = partition_of(name, geglu)
            full = (
                tensor
                if spec is None or tp == 1
                else unshard_tensors([s[name] for s in shards], *spec)
            )
            merged[_global_name(name, ranges)] = full
    return merged


def _global_name(name: str, ranges) -> str:
    """A stage's parameter name in the single-model numbering (``[chunk.]transformer.layers.{local}``)."""
    if ranges is None:
        return name
    parts = name.split(".")
    chunk = 0
    # interleaved: the engine wrapped a ModuleList of chunks
    if parts[0].isdigit() and len(ranges) > 1:
        chunk, parts = int(parts[0]), parts[1:]
    if parts[:2] == ["transformer", "layers"]:
        parts[2] = str(ranges[chunk][0] + int(parts[2]))
    return ".".join(parts)
