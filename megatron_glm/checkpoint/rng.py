"""Random states in checkpoints: torch's, Python's and the tensor-parallel tracker's, one file per rank."""

from __future__ import annotations

import os
import random

import torch

from megatron_glm import serialization
from megatron_glm.checkpoint.format import rng_file
from megatron_glm.parallel import state as parallel_state
from megatron_glm.parallel.random import get_rng_tracker


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "tracker": get_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    get_rng_tracker().set_states(state.get("tracker", {}))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def position() -> tuple[int, int, int]:
    """This rank's (pipeline, tensor, data) ranks; (0, 0, 0) outside a parallel run."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 0, 0
    return (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )


def restore_rng(folder: str, trust: bool = False, required: bool = True) -> bool:
    """This rank's random states from ``folder``; with more data-parallel replicas than were saved, replica 0's
    streams. Whether a file was found (``required``: a missing one is an error)."""
    pp, tp, dp = position()
    path = rng_file(folder, pp, tp, dp)
    if not os.path.exists(path):
        path = rng_file(folder, pp, tp, 0)
    if not os.path.exists(path) and not required:
        return False
    set_rng_state(serialization.load(path, trust=trust))
    return True
