"""The checkpoint format: its names, ``latest``, ``meta.json`` and what a user's path holds.

A checkpoint folder (``--save``) holds ``iter_{N:07d}/`` folders and ``latest``, which names the
newest complete one (the file DeepSpeed reads too). Each iteration folder holds DeepSpeed's
files (``mp_rank_{pp * tp + t:02d}_model_states.pt`` per model-parallel rank, the optimizer's
partitions), one ``rng_state_pp{p}_tp{t}_dp{d}.pt`` per rank, and ``meta.json``: the model,
tokenizer, layout, iteration, consumed samples and the run's settings (``settings.py``).
A ``meta.json`` is written last, so an iteration folder without one is incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import os

from megatron_glm.settings import Settings, recorded

LATEST = "latest"
LOCK = ".lock"  # held by the run writing the folder (save_lock.py)
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here (another architecture, tokenizer, missing files)."""


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def model_file(folder: str, pp_rank: int, tp_rank: int, tp: int) -> str:
    """A model-parallel rank's weights in an iteration folder: DeepSpeed's name, by rank pp_rank * tp + tp_rank."""
    return os.path.join(folder, f"mp_rank_{pp_rank * tp + tp_rank:02d}_model_states.pt")


def rng_file(folder: str, pp: int, tp: int, dp: int) -> str:
    """RNG states are keyed by position in the layout, so a resume with another DP size finds them."""
    return os.path.join(folder, f"rng_state_pp{pp:02d}_tp{tp:02d}_dp{dp:03d}.pt")


def decays(name: str) -> bool:
    """Whether a parameter takes weight decay: not biases and LayerNorm (Megatron's rule). The optimizer's
    state in a checkpoint lists the decayed parameters' group first."""
    return not (name.endswith("bias") or "layernorm" in name)


def settings_of(meta: dict) -> Settings:
    """The settings of the run that wrote ``meta`` (older checkpoints: its recorded flags)."""
    return recorded(meta)


def settings_for_layout(meta: dict, tp: int, pp: int, vpp: int = 1, pipeline_layers=None) -> dict:
    """``meta``'s recorded settings for a copy of its weights on another layout, without ZeRO partitions
    (a converted checkpoint's ``settings``)."""
    settings = settings_of(meta)
    layers = settings.model.num_layers
    parallel = dataclasses.replace(
        settings.parallel,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        zero_stage=0,
        cpu_offload=False,
        pipeline_layers=tuple(pipeline_layers) if pipeline_layers else None,
        num_layers_per_virtual_pipeline_stage=layers // (pp * vpp)
        if vpp > 1 and not pipeline_layers
        else None,
    )
    return dataclasses.replace(settings, parallel=parallel).record()


def list_checkpoints(save_dir: str) -> list[int]:
    if not os.path.isdir(save_dir):
        return []
    return sorted(
        int(n[5:]) for n in os.listdir(save_dir) if n.startswith("iter_") and n[5:].isdigit()
    )


def resume_tag(load_dir: str) -> str | None:
    """The newest complete checkpoint: a folder under a final name is complete by construction.

    It is normally the one ``latest`` names; a run killed between renaming a new checkpoint
    into place and updating ``latest`` leaves a newer complete one, which wins.
    """
    done = [
        i
        for i in list_checkpoints(load_dir)
        if os.path.exists(os.path.join(load_dir, tag_of(i), META))
    ]
    return tag_of(done[-1]) if done else None


def is_iteration_folder(path: str) -> bool:
    name = os.path.basename(os.path.normpath(path))
    return name.startswith("iter_") and name[5:].isdigit() and os.path.isdir(path)


def what_is_at(path: str) -> str:
    """What a path the user named as a checkpoint holds instead of one: the rest of an error's sentence."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isfile(path):
        if os.path.basename(path) == LATEST:
            return f"is the {LATEST} file of a checkpoint folder: pass the folder, {os.path.dirname(path) or '.'}"
        return "is a file, not a checkpoint folder"
    names = sorted(os.listdir(path))
    if not names:
        return "is an empty folder: no checkpoint was saved there"
    if is_iteration_folder(path):
        return (
            "is an unfinished checkpoint (no meta.json: its save did not complete); pass its folder, "
            f"{os.path.dirname(os.path.normpath(path)) or '.'}, to resume the newest complete one"
        )
    if any(n.startswith("iter_") or n.startswith(".tmp-iter_") for n in names):
        return "holds no complete checkpoint (iter_*/meta.json): every save there was interrupted before it finished"
    if LOCK in names or "metrics.jsonl" in names:
        return "holds no checkpoint yet: the run that logged there saved none"
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return f"is an export-hf folder: import it first (glm-convert import-hf --load {path} --save NEW_FOLDER)"
    if any(f.startswith("mp_rank_") for _, _, files in os.walk(path) for f in files):
        return (
            "is an original GLM checkpoint: import it first "
            f"(glm-convert import-thudm --load {path} --save NEW_FOLDER)"
        )
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"holds no megatron-glm checkpoint (iter_*/meta.json); it holds {shown}"


def locate(path: str) -> tuple[str, str]:
    """``(folder, tag)`` of the checkpoint a user names: a checkpoint folder, whose newest complete
    checkpoint it is, or one ``iter_N`` folder in it, which is that iteration. Anything else is
    refused with what is there instead, so that a mistyped path never means "start from scratch"."""
    if is_iteration_folder(path) and os.path.isfile(os.path.join(path, META)):
        path = os.path.normpath(path)
        return os.path.dirname(path) or ".", os.path.basename(path)
    tag = resume_tag(path) if os.path.isdir(path) and not is_iteration_folder(path) else None
    if tag is None:
        raise CheckpointError(f"{path} {what_is_at(path)}")
    return path, tag


def read_latest(load_dir: str) -> str | None:
    path = os.path.join(load_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def read_meta(load_dir: str, tag: str) -> dict:
    folder = os.path.join(load_dir, tag)
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"{load_dir}/{LATEST} names {tag}, but {folder} does not exist; "
            f"point {LATEST} at one of {[tag_of(i) for i in list_checkpoints(load_dir)]}"
        )
    path = os.path.join(folder, META)
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is corrupt ({e}): not a megatron-glm checkpoint's meta.json; "
            "load another checkpoint"
        ) from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("model"), dict)
        or "iteration" not in meta
    ):
        raise CheckpointError(
            f"{path} lacks the model configuration or the iteration: not a megatron-glm "
            "checkpoint's meta.json"
        )
    return meta
