"""A glm-pretrain checkpoint -> a layout-free one, in DeepSpeed's universal checkpoint layout.

``{out}/iter_N/zero/{name}/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt`` and ``step.pt`` hold
each parameter's whole fp32 master weight, Adam moments and step (``{"param": tensor}``, as
DeepSpeed's ``ds_to_universal`` writes them), under the single-model names; ``meta.json``
(``"universal": true``) carries the iteration, consumed samples, lr schedule and loss scale.
Nothing in it depends on the TP x PP x DP layout or the ZeRO stage it came from: glm-pretrain
resumes it on any layout, each rank reading only its own parameters and slicing its TP shard.
DeepSpeed's own universal loader cannot be used for that: it finds parameters by the
engine's names, which here are a pipeline stage's local ones (``transformer.layers.0`` on
every stage).

The conversion reads the whole model three times over (weights and two moments) into host
memory, once; it runs offline, on one process.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch
from tqdm import tqdm

from megatron_glm import checkpoint as ckpt
from megatron_glm import serialization
from megatron_glm.checkpoint.universal import PARAM, STATES, param_file
from megatron_glm.config import ModelConfig
from megatron_glm.convert import readers
from megatron_glm.convert.layout import ConversionError, check_state
from megatron_glm.convert.writers import _commit, _nbytes, _stage


def _engine_state(folder: str, trust: bool) -> dict:
    """The lr schedule and step counters DeepSpeed keeps in rank 0's model file."""
    files = sorted(glob.glob(os.path.join(folder, "*mp_rank_00_model_states.pt")))
    if not files:
        raise ConversionError(
            f"{folder} has no mp_rank_00_model_states.pt: the checkpoint is incomplete"
        )
    model = serialization.load(files[0], trust=trust)
    sched = model.get("lr_scheduler")
    if not isinstance(sched, dict):
        raise ConversionError(
            f"{files[0]} holds no lr schedule: a converted (weights-only) checkpoint has no "
            "optimizer state to carry; use `glm-convert reshard`"
        )
    return {
        "lr_scheduler": {k: v for k, v in sched.items() if k != "lr_lambdas"},
        "global_steps": model.get("global_steps"),
        "global_samples": model.get("global_samples"),
        "skipped_steps": model.get("skipped_steps", 0),
    }


def _loss_scale(folder: str, trust: bool) -> float | None:
    files = sorted(glob.glob(os.path.join(folder, "*zero_pp_rank_0_mp_rank_00_optim_states.pt")))
    if not files:
        return None
    scaler = (
        serialization.load(files[0], trust=trust).get("optimizer_state_dict", {}).get("loss_scaler")
    )
    return float(scaler.cur_scale) if scaler is not None and hasattr(scaler, "cur_scale") else None


def write_universal(
    load: str,
    out: str,
    trust: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    iteration: int | None = None,
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
    cfg = ModelConfig.from_dict(meta["model"])
    engine = _engine_state(folder, trust)
    states = readers.optimizer_states(load, tag, meta, trust)
    for state, tensors in states.items():
        check_state(tensors, cfg, f"{folder} ({state})")
    step = readers.adam_steps(load, tag, meta, trust)
    names = sorted(states["fp32"])
    plan = [
        (param_file(tag, name, state), _nbytes([states[state][name]]) if state != "step" else 0)
        for name in names
        for state in (*STATES, "step")
    ] + [(os.path.join(tag, ckpt.META), 0), (ckpt.LATEST, 0)]
    if dry_run:
        return plan
    partial = _stage(out, overwrite)
    for name in tqdm(names, desc="writing parameters", unit="param", disable=len(names) < 64):
        os.makedirs(os.path.dirname(param_file(os.path.join(partial, tag), name, "fp32")))
        for state in STATES:
            torch.save(
                {PARAM: states[state][name].contiguous()},
                param_file(os.path.join(partial, tag), name, state),
            )
        torch.save(step, param_file(os.path.join(partial, tag), name, "step"))
    # meaningful again on the same TP x PP
    for rng in glob.glob(os.path.join(folder, "rng_state_*.pt")):
        shutil.copy2(rng, os.path.join(partial, tag))
    universal = {
        **meta,
        **engine,
        "universal": True,
        "adam_step": step,
        "loss_scale": _loss_scale(folder, trust),
        "converted_from": os.path.abspath(folder),
    }
    with open(os.path.join(partial, tag, ckpt.META), "w") as f:
        json.dump(universal, f, indent=1)
    with open(os.path.join(partial, ckpt.LATEST), "w") as f:
        f.write(tag)
    _commit(partial, out)
    return plan
