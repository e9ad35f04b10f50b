"""A glm-pretrain checkpoint -> a layout-free one, in DeepSpeed's universal checkpoint layout.

``{out}/iter_N/zero/{name}/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt`` and ``step.pt`` hold
each parameter's whole fp32 master weight, Adam moments and step (``{"param": tensor}``, as
DeepSpeed's ``ds_to_universal`` writes them), under the single-model names; ``meta.json``
(``"universal": true``) carries the iteration, consumed samples, lr schedule and loss scale.
Nothing in it depends on the TP x PP x DP layout or the ZeRO stage it came from. DeepSpeed's own
universal loader cannot read it back: it finds parameters by the engine's names, which here are
a pipeline stage's local ones (``transformer.layers.0`` on every stage); glm-pretrain can.

The conversion streams: each parameter is assembled from the source's partitions
(``checkpoint/partitions.py``), written and dropped before the next, so memory holds a few
parameters whatever the model's size; ``workers`` processes share the parameters.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil

import torch

from megatron_glm import checkpoint as ckpt
from megatron_glm import serialization
from megatron_glm.checkpoint.partitions import STATES, SavedTrainingState
from megatron_glm.checkpoint.universal import PARAM, param_file
from megatron_glm.config import ModelConfig
from megatron_glm.convert.layout import ConversionError, expected_shapes
from megatron_glm.convert.workers import run_jobs
from megatron_glm.convert.writers import _commit, _discarded_on_error, _stage


def _write_parameter(work, dest: str, name: str, shape, step: int) -> None:
    source = work.source
    os.makedirs(os.path.dirname(param_file(dest, name, "fp32")))
    for state in STATES:
        value = source.whole(name, state)
        if tuple(value.shape) != tuple(shape):
            raise ConversionError(
                f"{source}: {name} ({state}) has shape {tuple(value.shape)}, the model's is "
                f"{tuple(shape)}: the checkpoint does not match its meta.json"
            )
        serialization.check_finite([(f"{name} ({state})", value)], str(source))
        torch.save({PARAM: value.contiguous()}, param_file(dest, name, state))
    torch.save(step, param_file(dest, name, "step"))


def write_universal(
    load: str,
    out: str,
    trust: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    iteration: int | None = None,
    workers: int = 1,
) -> list[tuple[str, int]]:
    """Convert ``load``'s checkpoint of ``iteration`` (the latest complete one by default); returns the plan."""
    try:
        load, tag = ckpt.locate(load)
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    if iteration is not None:
        if iteration not in ckpt.list_checkpoints(load):
            raise ConversionError(
                f"{load} has no checkpoint of iteration {iteration}; it has "
                f"{ckpt.list_checkpoints(load)}"
            )
        tag = ckpt.tag_of(iteration)
    meta = ckpt.read_meta(load, tag)
    if meta.get("weights_only"):
        raise ConversionError(
            f"{load}/{tag} is weights-only (a glm-convert output): it has no optimizer state "
            "to carry; glm-pretrain resumes it on any layout after `glm-convert reshard`"
        )
    if meta.get("universal"):
        raise ConversionError(
            f"{load}/{tag} is already universal: glm-pretrain resumes it on any layout"
        )
    folder = os.path.join(load, tag)
    want = expected_shapes(ModelConfig.from_dict(meta["model"]))
    try:
        source = SavedTrainingState(folder, meta, trust)
        training = source.training_meta()
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    missing, unexpected = (
        sorted(set(want) - set(source.names())),
        sorted(set(source.names()) - set(want)),
    )
    if missing or unexpected:
        raise ConversionError(
            f"{folder} does not hold the model its meta.json describes: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    names = sorted(want)
    plan = [
        (param_file(tag, name, state), 4 * math.prod(want[name]) if state != "step" else 0)
        for name in names
        for state in (*STATES, "step")
    ] + [(os.path.join(tag, ckpt.META), 0), (ckpt.LATEST, 0)]
    if dry_run:
        return plan
    partial = _stage(out, overwrite)
    dest, step = os.path.join(partial, tag), training["adam_step"]
    with _discarded_on_error(partial):
        jobs = [(dest, name, want[name], step) for name in names]
        run_jobs(source, _write_parameter, jobs, workers, "writing parameters", "param")
    # meaningful again on the same TP x PP
    for rng in glob.glob(os.path.join(folder, "rng_state_*.pt")):
        shutil.copy2(rng, os.path.join(partial, tag))
    universal = {**meta, **training, "universal": True, "converted_from": os.path.abspath(folder)}
    with open(os.path.join(partial, tag, ckpt.META), "w") as f:
        json.dump(universal, f, indent=1)
    with open(os.path.join(partial, ckpt.LATEST), "w") as f:
        f.write(tag)
    _commit(partial, out)
    return plan
