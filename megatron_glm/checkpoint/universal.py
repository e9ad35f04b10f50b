"""Resume the whole training state on another TP x PP x DP layout, ZeRO stage or vocabulary padding.

The source is a glm-pretrain checkpoint saved on any layout (read from its partitions,
``partitions.py``), or a universal one (``glm-convert to-universal``): each parameter's whole
fp32 master weight, Adam moments and step in DeepSpeed's universal layout
(``zero/{name}/fp32.pt`` ...), under the single-model names. Either way each rank reads only its
own parameters, one at a time, and slices its TP shard: the weights go into the model before the
engine is built, then the exact fp32 masters, the moments and the step go into whatever optimizer
DeepSpeed built (any ZeRO stage) through its tensor-fragment API, and the lr schedule and step
counters into the engine.
"""

from __future__ import annotations

import os

import torch

from megatron_glm import serialization
from megatron_glm.checkpoint.format import CheckpointError
from megatron_glm.checkpoint.partitions import STATES, SavedTrainingState
from megatron_glm.checkpoint.rng import restore_rng
from megatron_glm.model.parallelize import partition_of
from megatron_glm.parallel import state as parallel_state
from megatron_glm.parallel.tensor_parallel import shard_tensor

PARAM = "param"  # the tensor's key in a universal parameter file (DeepSpeed's)
MOMENTS = STATES[1:]
EMBEDDING = "word_embeddings.weight"  # its rows: the padded vocabulary, which follows TP


def param_file(folder: str, name: str, state: str) -> str:
    return os.path.join(folder, "zero", name, f"{state}.pt")


def read_state(folder: str, name: str, state: str, trust: bool = False):
    path = param_file(folder, name, state)
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path} is missing: the universal checkpoint is incomplete; copy it whole, or "
            "convert it again (glm-convert to-universal)"
        )
    value = serialization.load(path, trust=trust)
    if state == "step":
        return int(value)
    if not isinstance(value, dict) or not torch.is_tensor(value.get(PARAM)):
        raise CheckpointError(
            f"{path} holds no tensor under {PARAM!r}: not a universal checkpoint's parameter file"
        )
    return value[PARAM]


def local_parameters(chunks):
    """(name in the rank's module, parameter, name in the single model) for this rank's chunks."""
    for c, chunk in enumerate(chunks):
        for name, p in chunk.named_parameters():
            yield (f"{c}.{name}" if len(chunks) > 1 else name), p, chunk.full_name(name)


def _repad(whole: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows, or zero rows appended up to ``rows``."""
    if rows < whole.shape[0]:
        return whole[:rows].clone()
    return torch.cat([whole, whole.new_zeros(rows - whole.shape[0], *whole.shape[1:])])


class UniversalFiles:
    """A universal checkpoint's tensors; the training state beside them is in its meta.json already."""

    def __init__(self, folder: str, trust: bool = False):
        self.folder, self.trust = folder, trust

    def whole(self, name: str, state: str) -> torch.Tensor:
        return read_state(self.folder, name, state, self.trust)

    def training_meta(self) -> dict:
        return {}


class StateReader:
    """This rank's shards of a checkpoint's fp32 masters and Adam moments, from ``source`` (``UniversalFiles``
    or ``SavedTrainingState``: ``whole(name, state)`` and ``training_meta()``).

    ``vocab_rows``: this layout's padded vocabulary. The word embeddings (weights and moments) of a
    checkpoint padded otherwise get their padding rows dropped, or zero rows added (the resume
    check has made sure the tokenizer's rows fit both); the true vocabulary's rows are unchanged.
    """

    def __init__(
        self,
        source,
        tp_rank: int,
        tp: int,
        geglu: bool,
        trust: bool = False,
        vocab_rows: int | None = None,
    ):
        self.source, self.folder = source, source.folder
        self.tp_rank, self.tp, self.geglu, self.trust = tp_rank, tp, geglu, trust
        self.vocab_rows = vocab_rows

    def shard(self, full_name: str, state: str, shape) -> torch.Tensor:
        whole = self.source.whole(full_name, state)
        if full_name == EMBEDDING and self.vocab_rows and whole.shape[0] != self.vocab_rows:
            whole = _repad(whole, self.vocab_rows)
        spec = partition_of(full_name, self.geglu) if self.tp > 1 else None
        value = shard_tensor(whole, *spec, self.tp_rank, self.tp) if spec else whole
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.folder} ({full_name}, {state}): {tuple(whole.shape)} does not give "
                f"this rank's {tuple(shape)} for TP {self.tp}: the checkpoint holds another model"
            )
        return value

    def weights(self, chunks) -> tuple[dict, str]:
        """The fp32 weights of this rank's (meta) chunks: ``build_rank_model``'s ``weights``."""
        return {
            local: self.shard(full, "fp32", p.shape) for local, p, full in local_parameters(chunks)
        }, self.folder


def restore_optimizer(engine, chunks, reader: StateReader, meta: dict) -> None:
    """fp32 masters, Adam moments and step, the lr schedule and counters of ``reader``'s checkpoint
    (``meta``: its meta.json) into ``engine``.

    Adam's state is created lazily at the first step, so it is built here, in the layout each of
    DeepSpeed's optimizers keeps (as DeepSpeed's own universal loader does for its names).
    """
    meta = {**meta, **reader.source.training_meta()}
    opt, step = engine.optimizer, torch.tensor(float(meta["adam_step"]))
    names = {id(p): full for _, p, full in local_parameters(chunks)}

    def values(p, shape):
        return {state: reader.shard(names[id(p)], state, shape) for state in STATES}

    # ZeRO-3: each parameter's DP partition, concatenated
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        for i, group in enumerate(opt.fp16_groups):
            flat = opt.fp32_partitioned_groups_flat[i]
            parts = {state: [] for state in STATES}
            for p in group:
                whole = values(p, p.ds_shape)
                owners = (
                    opt._get_param_partition_group(p)
                    if hasattr(opt, "_get_param_partition_group")
                    else opt.dp_process_group
                )
                world, rank = (
                    torch.distributed.get_world_size(owners),
                    torch.distributed.get_rank(owners),
                )
                size = -(-p.ds_numel // world)
                for state, v in whole.items():
                    padded = torch.nn.functional.pad(v.flatten(), (0, size * world - v.numel()))
                    parts[state].append(padded.narrow(0, rank * size, size))
            flat.data.copy_(torch.cat(parts["fp32"]))
            opt.optimizer.state[flat] = {
                "step": step.clone(),
                **{m: torch.cat(parts[m]).to(flat.device) for m in MOMENTS},
            }
    # ZeRO-1/2, bf16: fragments of flat groups
    elif hasattr(opt, "bit16_groups") or hasattr(opt, "bf16_groups"):
        from deepspeed.utils import safe_set_full_fp32_param
        from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

        lp_groups = opt.bit16_groups if hasattr(opt, "bit16_groups") else opt.bf16_groups
        for i, group in enumerate(opt.optimizer.param_groups):
            flat = group["params"][0]
            for p in lp_groups[i]:
                if p._hp_mapping is None:  # none of it lies in this rank's partition
                    continue
                whole, at = values(p, p.shape), p._hp_mapping.lp_fragment_address
                safe_set_full_fp32_param(p, whole["fp32"])
                p._hp_mapping.optim_fragment = {
                    m: whole[m].flatten().narrow(0, at.start, at.numel) for m in MOMENTS
                }
            map_to_flat_opt_states(flat, lp_groups[i], opt.optimizer.state, list(MOMENTS))
            opt.optimizer.state[flat]["step"] = step.clone()
    else:  # no ZeRO, fp32: the module's parameters are the optimizer's
        for _, p, _ in local_parameters(chunks):
            whole = values(p, p.shape)
            with torch.no_grad():
                p.copy_(whole["fp32"])
            opt.state[p] = {"step": step.clone(), **{m: whole[m].to(p.device) for m in MOMENTS}}
    schedule = engine.lr_scheduler
    schedule.load_state_dict({**schedule.state_dict(), **meta["lr_scheduler"]})
    for group, lr in zip(opt.param_groups, schedule.get_last_lr()):
        group["lr"] = lr  # the step after the resume runs at the saved rate, as it would have
    engine.global_steps = meta.get("global_steps") or meta["iteration"]
    engine.global_samples = meta.get("global_samples") or meta.get("consumed_samples", 0)
    engine.skipped_steps = meta.get("skipped_steps", 0)
    scaler = getattr(opt, "loss_scaler", None)
    if meta.get("loss_scale") and engine.fp16_enabled() and scaler is not None:
        scaler.cur_scale = meta["loss_scale"]


def reader_for(
    resume, layout, geglu: bool, trust: bool = False, vocab_rows: int | None = None
) -> StateReader:
    """This rank's reader of ``resume``'s training state: a universal checkpoint's files, or the
    partitions of one saved on another layout."""
    folder = os.path.join(resume.load_dir, resume.tag)
    source = (
        UniversalFiles(folder, trust)
        if resume.universal
        else SavedTrainingState(folder, resume.meta, trust)
    )
    return StateReader(
        source,
        layout.tp_rank,
        layout.tp,
        geglu,
        trust,
        vocab_rows,
    )


def load(
    engine, chunks, reader: StateReader, resume, optimizer: bool = True, rng: bool = True
) -> None:
    """The training state after the weights: optimizer and schedule unless ``optimizer`` is False
    (``--no-load-optim``), and RNG when the layout is the one it was saved on (otherwise the
    streams of ``--seed``: a TP rank's dropout stream has no counterpart on another TP size)."""
    if optimizer:
        restore_optimizer(engine, chunks, reader, resume.meta)
    meta = resume.meta
    pp = (
        parallel_state.get_pipeline_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )
    same = (
        meta.get("tensor_model_parallel_size", 1),
        meta.get("pipeline_model_parallel_size", 1),
    ) == (reader.tp, pp)
    if rng and same:
        restore_rng(reader.folder, reader.trust, required=False)
