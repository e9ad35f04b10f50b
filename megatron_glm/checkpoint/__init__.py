"""Checkpoints: the format and its names, atomic and background saves, resume and its checks, reading weights.

Training, conversion, evaluation and generation all read and write checkpoints through this
package; its parts, one concern each:

- ``format``: names, ``latest``, ``meta.json``, what a user's path holds, the run's recorded settings;
- ``save``, ``async_save``, ``save_lock``: staged saves published by rename, in the background, one run per folder;
- ``rng``: random states per rank;
- ``resume``, ``deepspeed_io``, ``universal``, ``partitions``: where a run resumes, whether it can, and
  restoring the engine, on the layout it was saved on or another;
- ``checkpointer``: a run's save policy;
- ``weights``: weights without DeepSpeed, one rank's or all shards merged.
"""

from megatron_glm.checkpoint.checkpointer import Checkpointer
from megatron_glm.checkpoint.deepspeed_io import load_checkpoint, read_safely
from megatron_glm.checkpoint.format import (
    LATEST,
    LOCK,
    META,
    CheckpointError,
    decays,
    is_iteration_folder,
    list_checkpoints,
    locate,
    model_file,
    read_latest,
    read_meta,
    resume_tag,
    rng_file,
    settings_of,
    tag_of,
    what_is_at,
)
from megatron_glm.checkpoint.resume import (
    ResumePoint,
    check_compatible,
    find_resume,
    layout_changes,
)
from megatron_glm.checkpoint.save import prune, save_checkpoint
from megatron_glm.checkpoint.save_lock import lock_save_folder
from megatron_glm.checkpoint.weights import (
    load_model_weights,
    merge_model_shards,
    read_weights_only,
)

__all__ = [
    "LATEST",
    "LOCK",
    "META",
    "CheckpointError",
    "Checkpointer",
    "ResumePoint",
    "check_compatible",
    "decays",
    "find_resume",
    "is_iteration_folder",
    "layout_changes",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "locate",
    "lock_save_folder",
    "merge_model_shards",
    "model_file",
    "prune",
    "read_latest",
    "read_meta",
    "read_safely",
    "read_weights_only",
    "resume_tag",
    "rng_file",
    "save_checkpoint",
    "settings_of",
    "tag_of",
    "what_is_at",
]
