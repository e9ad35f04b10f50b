"""glm-pretrain --dry-run: one process on fake tensors stands in for a job's ranks.

Checked against real CPU runs of the same flags (their measured peaks, ``--measure-memory``),
against the traffic counted by hand for the layouts, and for the errors a real start gives.
"""

import glob
import json

import pytest

from tests.helpers import launch_pretrain


def job_flags(prefix, model, tmp_path, *extra):
    return [
        "--data-path",
        prefix,
        "--tokenizer-model",
        model,
        "--num-layers",
        "4",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "128",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--train-iters",
        "2",
        "--lr",
        "1e-3",
        "--split",
        "100,0,0",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--log-dir",
        str(tmp_path),
        "--data-cache-path",
        str(tmp_path / "cache"),
        *extra,
    ]


def dry_run(argv, world: int, *extra):
    from megatron_glm.training.pretrain import pretrain

    return pretrain(
        [*argv, "--dry-run", "--world-size", str(world), "--dry-run-device", "cpu", *extra]
    )


LAYOUTS = {  # name: (processes, flags)
    "TP2": (2, ["--tensor-model-parallel-size", "2"]),
    "PP2 uneven": (
        2,
        ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"],
    ),
    "DP2 ZeRO-3": (2, ["--zero-stage", "3"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.slow
def test_dry_run_memory_is_within_ten_percent_of_a_real_run(tmp_path, data, name):
    nproc, extra = LAYOUTS[name]
    prefix, model = data
    real = tmp_path / "real"
    argv = job_flags(prefix, model, real, *extra)
    result = launch_pretrain(nproc, [*argv, "--measure-memory"])
    assert result.returncode == 0, result.stderr[-5000:]
    measured = {}
    for path in glob.glob(str(real / "memory_rank*.json")):
        report = json.load(open(path))
        measured[int(path.split("rank")[-1].split(".")[0])] = report

    out = dry_run(
        job_flags(prefix, model, tmp_path / "dry", *extra), nproc, "--dry-run-ranks", "0", "1"
    )
    reports = {r["rank"]: r for r in out["dry_run"]}
    assert sorted(reports) == sorted(measured) == [0, 1]
    for rank, report in reports.items():
        assert report["peak"] == pytest.approx(measured[rank]["peak_bytes"], rel=0.10), (
            name,
            rank,
            report,
            measured[rank],
        )
