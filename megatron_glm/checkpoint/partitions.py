"""A glm-pretrain checkpoint's training state, one whole parameter at a time, from the files its ranks wrote.

Each parameter's fp32 master weight and Adam moments are assembled from where DeepSpeed put them:

- ZeRO-1/2 and DeepSpeed's bf16 optimizer: every data-parallel rank's optimizer file holds one
  equal slice of each parameter group's flat fp32 buffer (and of each moment), and lists the
  fragment of every parameter that falls in it (``param_slice_mappings``: start and length).
  A parameter is its fragments in data-parallel rank order.
- ZeRO-3: every parameter is split on its own into ``ceil(numel / dp)`` elements per rank, laid
  end to end in each rank's flat group in the order of the model file's ``param_shapes``.
- No ZeRO (fp32): the weights are the masters, and the moments sit in the model file's optimizer
  state, in the order the optimizer was given its parameters (decayed ones first).

Then the source TP shards are merged (``partition_of``). Files are memory-mapped and every read
is copied out, so a reader holds one parameter at a time, never a rank's shard or the model:
resuming on another layout (``glm-pretrain --load``) and ``glm-convert to-universal`` both stream.
"""

from __future__ import annotations

import glob
import math
import os

import torch

from megatron_glm.checkpoint.format import CheckpointError, decays, model_file, settings_of
from megatron_glm.checkpoint.mapped import MappedFile
from megatron_glm.checkpoint.weights import _global_name
from megatron_glm.model.parallelize import partition_of
from megatron_glm.parallel.tensor_parallel import unshard_tensors, unsharded_shape

STATES = ("fp32", "exp_avg", "exp_avg_sq")
_OPTIM = "optimizer_state_dict"


def _require(value, path: str, what: str):
    if value is None:
        raise CheckpointError(
            f"{path} holds no {what}: not a file of a glm-pretrain checkpoint with its optimizer "
            "state (a weights-only glm-convert output carries no training state)"
        )
    return value


class _Partitioned:
    """One model-parallel rank's parameters in ZeRO-1/2 (or bf16) partitions: one file per data-parallel rank."""

    def __init__(self, folder: str, mp: int, trust: bool):
        self.files = _optimizer_files(folder, mp, trust, "*zero_pp_rank_*")
        first = self.files[0].value[_OPTIM]
        count = first.get("partition_count")
        _complete(self.files, max(count) if isinstance(count, list) else count, folder, mp)
        _require(first.get("param_slice_mappings"), self.files[0].path, "param_slice_mappings")
        path = model_file(folder, 0, mp, 1)
        groups = _require(MappedFile(path, trust).value.get("param_shapes"), path, "param_shapes")
        self.group = {name: g for g, group in enumerate(groups) for name in group}
        self.shapes = {name: torch.Size(shape) for group in groups for name, shape in group.items()}

    def names(self):
        return list(self.shapes)

    def read(self, name: str, state: str) -> torch.Tensor:
        g, pieces = self.group[name], []
        for file in self.files:
            osd = file.value[_OPTIM]
            where = osd["param_slice_mappings"][g].get(name)
            if where is None:
                continue
            flat = (
                osd["single_partition_of_fp32_groups"][g]
                if state == "fp32"
                else _moment(osd["base_optimizer_state"], g, state, file.path)
            )
            pieces.append(file.copy(flat.narrow(0, where.start, where.numel)))
        return torch.cat(pieces).view(self.shapes[name])

    def adam(self) -> dict:
        return self.files[0].value[_OPTIM]["base_optimizer_state"]


class _Zero3:
    """One model-parallel rank's parameters in ZeRO-3 partitions: each split on its own over the data-parallel files."""

    def __init__(self, folder: str, mp: int, trust: bool):
        self.files = _optimizer_files(folder, mp, trust, "zero_pp_rank_*")
        world = self.files[0].value[_OPTIM].get("partition_count")
        _complete(self.files, world, folder, mp)
        path = os.path.join(folder, f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt")
        groups = _require(MappedFile(path, trust).value.get("param_shapes"), path, "param_shapes")
        self.shapes, self.place = {}, {}
        for g, group in enumerate(groups):
            offset = 0
            for name, shape in group.items():
                size = math.ceil(math.prod(shape) / world)
                self.shapes[name], self.place[name] = torch.Size(shape), (g, offset, size)
                offset += size

    def names(self):
        return list(self.shapes)

    def read(self, name: str, state: str) -> torch.Tensor:
        (g, offset, size), shape = self.place[name], self.shapes[name]
        pieces = []
        for file in self.files:
            osd = file.value[_OPTIM]
            flat = (
                osd["fp32_flat_groups"][g]
                if state == "fp32"
                else _moment(osd[_OPTIM], g, state, file.path)
            )
            pieces.append(file.copy(flat.narrow(0, offset, size)))
        return torch.cat(pieces)[: math.prod(shape)].view(shape)

    def adam(self) -> dict:
        return self.files[0].value[_OPTIM][_OPTIM]


class _Unpartitioned:
    """One model-parallel rank's parameters without ZeRO in fp32: the module and its optimizer state."""

    def __init__(self, folder: str, mp: int, trust: bool):
        self.file = MappedFile(model_file(folder, 0, mp, 1), trust)
        path = self.file.path
        self.module = _require(self.file.value.get("module"), path, "model state dict")
        optimizer = self.file.value.get("optimizer")
        if not isinstance(optimizer, dict) or "state" not in optimizer:
            raise CheckpointError(
                f"{path} holds no Adam state of its own: a checkpoint saved without ZeRO in bf16 or "
                "fp16 keeps it in DeepSpeed's wrapper. Resume it on the layout it was saved on, or "
                "take its weights alone (glm-convert reshard)"
            )
        names = [n for n in self.module if decays(n)] + [n for n in self.module if not decays(n)]
        ids = [i for group in optimizer["param_groups"] for i in group["params"]]
        if len(ids) != len(names):
            raise CheckpointError(
                f"{path}: {len(ids)} optimizer entries for {len(names)} parameters"
            )
        self.state = {n: optimizer["state"][i] for n, i in zip(names, ids)}
        self.optimizer = optimizer

    def names(self):
        return list(self.module)

    @property
    def shapes(self) -> dict:
        return {name: tensor.shape for name, tensor in self.module.items()}

    def read(self, name: str, state: str) -> torch.Tensor:
        if state == "fp32":
            return self.file.copy(self.module[name])
        value = self.state[name].get(state)
        return self.file.copy(_require(value, self.file.path, f"Adam {state} of {name}"))

    def adam(self) -> dict:
        return self.optimizer


def _optimizer_files(folder: str, mp: int, trust: bool, pattern: str) -> list[MappedFile]:
    paths = glob.glob(os.path.join(folder, f"{pattern}_mp_rank_{mp:02d}_optim_states.pt"))
    if not paths:
        raise CheckpointError(
            f"{folder} holds no optimizer partitions of model-parallel rank {mp} "
            f"({pattern}_mp_rank_{mp:02d}_optim_states.pt): the checkpoint is incomplete"
        )
    return [MappedFile(p, trust) for p in sorted(paths, key=_dp_rank)]


def _dp_rank(path: str) -> int:
    return int(os.path.basename(path).split("zero_pp_rank_")[1].split("_")[0])


def _complete(files, count, folder: str, mp: int) -> None:
    found = [_dp_rank(f.path) for f in files]
    if not files or count is None or found != list(range(count)):
        raise CheckpointError(
            f"{folder} holds optimizer partitions {found} of model-parallel rank {mp}, of "
            f"{count or '?'} written: the checkpoint is incomplete (copy it whole, or resume an "
            "earlier iteration)"
        )


def _moment(base: dict, g: int, state: str, path: str) -> torch.Tensor:
    try:
        return base["state"][g][state]
    except (KeyError, IndexError, TypeError):
        raise CheckpointError(
            f"{path} holds no Adam {state} for parameter group {g}: not an Adam optimizer's state, "
            "or saved before the first step"
        ) from None


class SavedTrainingState:
    """The fp32 masters and Adam moments of a glm-pretrain checkpoint (one ``iter_N`` folder), per parameter.

    ``whole(name, state)``: the single-model parameter ``name``'s ``state`` ("fp32", "exp_avg" or
    "exp_avg_sq"), merged over the layout it was saved on.
    """

    def __init__(self, folder: str, meta: dict, trust: bool = False):
        self.folder, self.trust = folder, trust
        self.opener = (SavedTrainingState, folder, meta, trust)  # how a worker process opens it
        self.tp = meta.get("tensor_model_parallel_size", 1)
        self.pp = meta.get("pipeline_model_parallel_size", 1)
        self.geglu = meta["model"].get("geglu", False)
        zero = settings_of(meta).parallel.zero_stage
        if zero == 3:
            self.kind = _Zero3
        elif glob.glob(os.path.join(folder, "*zero_pp_rank_0_mp_rank_00_optim_states.pt")):
            self.kind = _Partitioned  # ZeRO-1/2, or DeepSpeed's bf16 optimizer (also on ZeRO-0)
        else:
            self.kind = _Unpartitioned
        self._ranks: dict[tuple[int, int], object] = {}
        self.where: dict[str, tuple[int, str]] = {}  # single-model name -> (source stage, its name)
        for p in range(self.pp):
            ranges = meta["pipeline_layers"][p] if self.pp > 1 else None
            for name in self._rank(p, 0).names():
                self.where.setdefault(_global_name(name, ranges), (p, name))

    def __str__(self) -> str:
        return self.folder

    def _rank(self, p: int, t: int):
        if (p, t) not in self._ranks:
            self._ranks[p, t] = self.kind(self.folder, p * self.tp + t, self.trust)
        return self._ranks[p, t]

    def names(self) -> list[str]:
        return sorted(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        """The whole parameter's shape, without reading it."""
        p, local = self._where(name)
        return unsharded_shape(
            self._rank(p, 0).shapes[local], partition_of(name, self.geglu), self.tp
        )

    def _where(self, name: str) -> tuple[int, str]:
        if name not in self.where:
            raise CheckpointError(f"{self} holds no {name}: it is not a checkpoint of this model")
        return self.where[name]

    def whole(self, name: str, state: str) -> torch.Tensor:
        p, local = self._where(name)
        spec = partition_of(name, self.geglu)
        if spec is None or self.tp == 1:
            return self._rank(p, 0).read(local, state)
        return unshard_tensors([self._rank(p, t).read(local, state) for t in range(self.tp)], *spec)

    def training_meta(self) -> dict:
        """What goes with the parameters: the lr schedule, DeepSpeed's step counters, Adam's step and the
        fp16 loss scale (the keys a universal checkpoint's meta.json adds)."""
        zero3 = self.kind is _Zero3
        path = (
            os.path.join(self.folder, "zero_pp_rank_0_mp_rank_00_model_states.pt")
            if zero3
            else model_file(self.folder, 0, 0, 1)
        )
        model = MappedFile(path, self.trust).value
        schedule = model.get("lr_scheduler")
        if not isinstance(schedule, dict):
            raise CheckpointError(
                f"{path} holds no lr schedule: a weights-only checkpoint (a glm-convert output) has "
                "no training state to carry"
            )
        adam = self._rank(0, 0).adam()
        steps = {int(s["step"]) for s in adam.get("state", {}).values() if "step" in s}
        if len(steps) != 1:
            raise CheckpointError(f"{self}: Adam step counts {sorted(steps)} (expected one count)")
        scaler = None
        if self.kind is not _Unpartitioned:
            scaler = self._rank(0, 0).files[0].value[_OPTIM].get("loss_scaler")
        return {
            "lr_scheduler": {k: v for k, v in schedule.items() if k != "lr_lambdas"},
            "global_steps": model.get("global_steps"),
            "global_samples": model.get("global_samples"),
            "skipped_steps": model.get("skipped_steps", 0),
            "adam_step": steps.pop(),
            "loss_scale": float(scaler.cur_scale) if hasattr(scaler, "cur_scale") else None,
        }
