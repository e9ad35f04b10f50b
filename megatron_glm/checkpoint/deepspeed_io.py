"""Restoring a DeepSpeed engine from a checkpoint, every file read through the allow-list."""

from __future__ import annotations

import os

from megatron_glm import serialization
from megatron_glm.checkpoint.format import CheckpointError, read_meta
from megatron_glm.checkpoint.rng import restore_rng


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine, reading every file through ``serialization.load``.

    DeepSpeed's own engines unpickle without restriction; this one delegates everything else
    (saving, commits, decoupled writers) to the engine DeepSpeed built.
    """

    def __init__(self, inner, trust: bool = False):
        self._inner, self._trust = inner, trust

    def load(self, path: str, map_location=None):
        return serialization.load(path, map_location=map_location, trust=self._trust)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def read_safely(engine, trust: bool = False) -> None:
    """Make ``engine`` read checkpoints through the allow-list (DeepSpeed takes no engine in ``initialize``)."""
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine, trust)


def load_checkpoint(
    engine, load_dir: str, tag: str, trust: bool = False, optimizer: bool = True, rng: bool = True
) -> dict:
    """Restore model, optimizer and scheduler (DeepSpeed; or the model alone), and RNG; returns the meta.

    The model alone: DeepSpeed copies the weights into the optimizer's fp32 master copies, and
    the optimizer and the lr schedule keep the fresh state they were built with.
    """
    meta = read_meta(load_dir, tag)
    read_safely(engine, trust)
    path, _ = engine.load_checkpoint(
        load_dir,
        tag=tag,
        load_optimizer_states=optimizer,
        load_lr_scheduler_states=optimizer,
        load_module_only=not optimizer,
    )
    if path is None:
        raise CheckpointError(
            f"DeepSpeed could not load {load_dir}/{tag}: its model states are missing"
        )
    if rng:
        restore_rng(os.path.join(load_dir, tag), trust)
    return meta
