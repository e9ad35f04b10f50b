"""Process groups in Megatron's rank order, Megatron's getter names, and rank discovery.

Rank order (Megatron's): tensor-parallel ranks are adjacent (one node's fast links), then
data parallel, then pipeline stages outermost: ``rank = (pp * dp_size + dp) * tp_size + tp``.
The getters keep Megatron's names because DeepSpeed takes this module as its ``mpu``.

Ranks come from whatever started the processes: torchrun's environment, Slurm's (``srun``
without torchrun), MPI (``mpirun``/``mpiexec``, OpenMPI or MPICH variables, mpi4py for the
master address), or nothing (one process). Layouts are checked before any group is built.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_STATE: dict = {}


class ParallelLayoutError(ValueError):
    """A TP x PP x DP layout the world size or the model cannot take."""


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | mpi | single


def _expand_first_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,009],login1``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def exit_without_teardown(code: int) -> None:
    """Flush and leave at once: gloo's worker threads can still be joinable during interpreter
    finalization and ``std::terminate`` a process that has finished its work (SIGABRT)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def discover_launch(environ=None) -> Launch:
    """Rank, world size, local rank and rendezvous address from the launcher's environment."""
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", 0)) or None
    # torchrun, deepspeed launcher, or anything exporting the same
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            port or 29500,
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _expand_first_host(
            env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        )
        job = int(env.get("SLURM_JOB_ID", "0"))
        return Launch(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            addr,
            port or 20000 + job % 20000,
            "slurm",
        )
    mpi_variables = (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    )
    for rank_key, size_key, local_key in mpi_variables:
        if rank_key in env and (size_key in env or rank_key == "PMIX_RANK"):
            from mpi4py import MPI  # the master's address travels over MPI itself

            comm = MPI.COMM_WORLD
            addr = comm.bcast(
                env.get("MASTER_ADDR") or (socket.gethostname() if comm.Get_rank() == 0 else None),
                root=0,
            )
            port = comm.bcast(port or (_free_port() if comm.Get_rank() == 0 else None), root=0)
            return Launch(
                comm.Get_rank(), comm.Get_size(), int(env.get(local_key, 0)), addr, port, "mpi"
            )
    return Launch(0, 1, 0, "127.0.0.1", port or _free_port(), "single")


def check_layout(
    world_size: int,
    tp: int,
    pp: int,
    num_attention_heads: int | None = None,
    hidden_size: int | None = None,
    vocab_size: int | None = None,
) -> int:
    """Data-parallel size of a layout, or ``ParallelLayoutError`` naming what does not divide."""
    problems = []
    if tp < 1 or pp < 1:
        problems.append(
            "--tensor-model-parallel-size and --pipeline-model-parallel-size must be at least 1"
        )
    elif world_size % (tp * pp):
        problems.append(
            f"world size {world_size} is not a multiple of tensor {tp} x pipeline {pp} parallel size"
        )
    if num_attention_heads is not None and tp >= 1 and num_attention_heads % tp:
        problems.append(
            f"--num-attention-heads {num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    if hidden_size is not None and tp >= 1 and hidden_size % tp:
        problems.append(
            f"--hidden-size {hidden_size} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if vocab_size is not None and tp >= 1 and vocab_size % tp:
        problems.append(
            f"padded vocabulary {vocab_size} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if problems:
        raise ParallelLayoutError("impossible parallel layout: " + "; ".join(problems))
    return world_size // (tp * pp)


def initialize_model_parallel(
    tp: int = 1, pp: int = 1, backend: str | None = None, **model_sizes
) -> Launch | None:
    """Start the process group (if needed) and build the TP, PP, DP and embedding groups."""
    launch = None
    if not dist.is_initialized():
        launch = discover_launch()
        check_layout(launch.world_size, tp, pp, **model_sizes)  # before any group exists
        # the standard variables, for DeepSpeed and anything else that reads them
        for key, value in (
            ("RANK", launch.rank),
            ("WORLD_SIZE", launch.world_size),
            ("LOCAL_RANK", launch.local_rank),
            ("MASTER_ADDR", launch.master_addr),
            ("MASTER_PORT", launch.master_port),
        ):
            os.environ.setdefault(key, str(value))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    dp = check_layout(world, tp, pp, **model_sizes)

    def index(p, d, t):
        return (p * dp + d) * tp + t

    pipelines = [[index(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    layouts = {
        "tp": [[index(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[index(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": pipelines,
        # first and last stage: the tied matrix
        "embedding": [sorted({ranks[0], ranks[-1]}) for ranks in pipelines],
        # DeepSpeed's "mp"
        "mp": [[index(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }
    groups = {}
    # every rank calls new_group for every group, in the same order
    for key, rank_lists in layouts.items():
        for ranks in rank_lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                groups[key], _STATE[f"{key}_ranks"] = group, ranks
    _STATE.update(groups=groups, tp=tp, pp=pp, dp=dp)
    return launch


def model_parallel_is_initialized() -> bool:
    return "groups" in _STATE


def destroy_model_parallel() -> None:
    _STATE.clear()


def _require():
    if not _STATE:
        raise RuntimeError(
            "model parallelism is not initialized: call initialize_model_parallel() first"
        )
    return _STATE


# -- Megatron's getters (DeepSpeed's mpu interface) ---------------------------------------
def get_tensor_model_parallel_group():
    return _require()["groups"]["tp"]


def get_pipeline_model_parallel_group():
    return _require()["groups"]["pp"]


def get_data_parallel_group():
    return _require()["groups"]["dp"]


def get_embedding_group():
    return _require()["groups"]["embedding"]


def get_tensor_model_parallel_world_size() -> int:
    return _STATE.get("tp", 1)


def get_pipeline_model_parallel_world_size() -> int:
    return _STATE.get("pp", 1)


def get_data_parallel_world_size() -> int:
    return _STATE.get("dp", 1)


def _index_in(key: str) -> int:
    if not _STATE:
        return 0
    return _STATE[key].index(dist.get_rank())


def get_tensor_model_parallel_rank() -> int:
    return _index_in("tp_ranks")


def get_pipeline_model_parallel_rank() -> int:
    return _index_in("pp_ranks")


def get_data_parallel_rank() -> int:
    return _index_in("dp_ranks")


def get_tensor_model_parallel_src_rank() -> int:
    return _require()["tp_ranks"][0]


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


# DeepSpeed's "model parallel" is TP x PP: checkpoint files are named by this rank
# (mp_rank_XX = pp_rank * tp + tp_rank) and gradient norms are summed over this group.
def get_model_parallel_group():
    return _require()["groups"]["mp"]


def get_model_parallel_world_size() -> int:
    return get_tensor_model_parallel_world_size() * get_pipeline_model_parallel_world_size()


def get_model_parallel_rank() -> int:
    return _index_in("mp_ranks")


def mark_for_gradient_norm(params) -> None:
    """Count each parameter once in DeepSpeed's model-parallel gradient norm.

    DeepSpeed counts a parameter when it is marked ``model_parallel`` or when this rank is
    model-parallel rank 0. Shards are marked already; replicated parameters (LayerNorms,
    biases, position tables) are marked on TP rank 0 of every pipeline stage, so each
    stage's copies count once and none twice.
    """
    if get_tensor_model_parallel_rank() != 0:
        return
    for p in params:
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = True
