"""Process groups and rank discovery: layouts, launchers' environments, and real launches."""

import json
import os
import subprocess
import sys

import pytest

from megatron_glm.parallel.state import (
    ParallelLayoutError,
    _expand_first_host,
    check_layout,
    discover_launch,
)
from tests.helpers import free_port, spawn

PROBE = os.path.join(os.path.dirname(__file__), "dist_probe.py")


def test_discovery_from_each_launcher_environment():
    torchrun = discover_launch(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "6000",
        }
    )
    assert (
        torchrun.rank,
        torchrun.world_size,
        torchrun.local_rank,
        torchrun.master_addr,
        torchrun.master_port,
        torchrun.source,
    ) == (3, 8, 1, "n1", 6000, "torchrun")
    slurm = discover_launch(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[007-010,012],cpu1",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.source) == (
        5,
        16,
        1,
        "gpu007",
        "slurm",
    )
    assert slurm.master_port == 20000 + 4242, "every task derives the same port from the job id"
    single = discover_launch({})
    assert (single.rank, single.world_size, single.source) == (0, 1, "single")
    assert _expand_first_host("node1") == "node1" and _expand_first_host("a[1-2]") == "a1"


@pytest.mark.parametrize(
    "world, tp, pp, sizes, message",
    [
        (8, 3, 1, {}, "not a multiple of tensor 3 x pipeline 1"),
        (6, 2, 2, {}, "not a multiple of tensor 2 x pipeline 2"),
        (8, 4, 1, {"num_attention_heads": 6}, "--num-attention-heads 6 is not divisible"),
        (8, 4, 1, {"hidden_size": 66}, "--hidden-size 66 is not divisible"),
        (4, 0, 1, {}, "must be at least 1"),
    ],
)
def test_impossible_layouts_are_named(world, tp, pp, sizes, message):
    with pytest.raises(ParallelLayoutError, match=message):
        check_layout(world, tp, pp, **sizes)
    assert check_layout(8, 2, 2) == 2


def refuse_worker(rank, world):
    import torch.distributed as dist

    from megatron_glm.parallel import state

    # as a user would start it: the layout is checked before any group exists
    os.environ.pop("RANK")
    os.environ.pop("WORLD_SIZE")
    try:
        state.initialize_model_parallel(tp=2, num_attention_heads=3)
    except ParallelLayoutError as e:
        return {"error": str(e), "initialized": dist.is_initialized()}
    return {"error": None}


def test_a_bad_layout_fails_before_any_process_group(tmp_path):
    (result,) = spawn(refuse_worker, 1, tmp_path)
    assert "not a multiple" in result["error"] and "not divisible" in result["error"]
    assert result["initialized"] is False


def groups_worker(rank, world):
    from megatron_glm.parallel import state

    state.initialize_model_parallel(tp=2, pp=2)
    return {k: state._STATE[k] for k in ("tp_ranks", "dp_ranks", "pp_ranks", "embedding_ranks")}


@pytest.mark.slow
def test_megatron_rank_order(tmp_path):
    results = spawn(groups_worker, 8, tmp_path)
    assert results[5] == {
        "tp_ranks": [4, 5],
        "dp_ranks": [5, 7],
        "pp_ranks": [1, 5],
        "embedding_ranks": [1, 5],
    }
    assert (
        results[0]["tp_ranks"] == [0, 1]
        and results[0]["dp_ranks"] == [0, 2]
        and results[0]["pp_ranks"] == [0, 4]
    )


def outputs(folder):
    return [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(2)]


def clean_env():
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "PMI", "OMPI_")
        )
    }


def check(found, source):
    assert [r["rank"] for r in found] == [0, 1] and all(r["source"] == source for r in found), found
    assert all(r["sum"] == 3.0 and r["world"] == 2 for r in found), (
        "the TP group all-reduced over both ranks"
    )
    assert [r["tp_rank"] for r in found] == [0, 1]


@pytest.mark.slow
def test_torchrun(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        PROBE,
        "2",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    check(outputs(tmp_path), "torchrun")


@pytest.mark.slow
def test_simulated_slurm_srun(tmp_path):
    """Two tasks as srun starts them: only SLURM_* variables, the master from the node list."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **clean_env(),
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_JOB_ID": "77",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, PROBE, "2", str(tmp_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in out]
    check(outputs(tmp_path), "slurm")


@pytest.mark.slow
def test_mpiexec(tmp_path):
    import mpi4py  # noqa: F401  (the test extra installs mpi4py and mpich)

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.fail("mpiexec is missing: the test extra installs mpich from PyPI")
    result = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, PROBE, "2", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    check(outputs(tmp_path), "mpi")
