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


def small_job(tmp_path, *extra):
    """A job whose data and tokenizer are not at hand: the dry run needs neither (--vocab-size)."""
    return job_flags(str(tmp_path / "absent"), str(tmp_path / "absent.model"), tmp_path, *extra) + [
        "--vocab-size",
        "1500",
    ]


def test_traffic_per_group_is_the_count_by_hand(tmp_path):
    b, s, h, layers, micro_batches, e = 2, 128, 64, 4, 4, 4  # fp32
    activation = e * b * s * h

    tp2 = dry_run(
        small_job(tmp_path, "--tensor-model-parallel-size", "2"), 2, "--dry-run-ranks", "0", "1"
    )["dry_run"]
    # per micro-batch: the vocab-parallel embedding's all-reduce, two row-parallel all-reduces per layer
    # forward and two column-parallel input-gradient all-reduces per layer backward, the output layer's
    # input gradient, and the vocab-parallel cross entropy's max, target logit and sum of exponentials
    per_micro_batch = activation * (1 + 2 * layers + 2 * layers + 1) + 3 * 4 * b * s
    assert [r["traffic"] for r in tp2] == [{"tp": micro_batches * per_micro_batch}] * 2

    pp2 = dry_run(
        small_job(
            tmp_path,
            "--pipeline-model-parallel-size",
            "2",
            "--decoder-first-pipeline-num-layers",
            "1",
        ),
        2,
        "--dry-run-ranks",
        "0",
        "1",
    )["dry_run"]
    tied = e * 1536 * h  # the padded vocabulary's rows
    first, last = pp2
    assert (first["layers"], last["layers"]) == (1, 3)
    # activations forward from the first stage, their gradients back from the last; the first stage
    # broadcasts the tied matrix, the last sends it its gradient
    assert first["traffic"] == {"pp": micro_batches * activation, "embedding": tied}
    assert last["traffic"] == {"pp": micro_batches * activation, "embedding": tied}


def test_fails_as_a_real_start_would(tmp_path):
    import subprocess
    import sys

    def glm_pretrain(*extra):
        cmd = [sys.executable, "-m", "megatron_glm.training.pretrain", *flags, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stderr

    flags = [*small_job(tmp_path), "--dry-run", "--dry-run-device", "cpu"]
    # a layout that does not divide the world
    rc, err = glm_pretrain("--world-size", "6", "--tensor-model-parallel-size", "4")
    assert rc == 1 and "world size 6 is not a multiple of tensor 4" in err, err
    # no world size
    rc, err = glm_pretrain()
    assert rc == 1 and "--dry-run needs --world-size N" in err, err
    # more memory than the devices have: the rank, what it needs, and what to change
    rc, err = glm_pretrain("--world-size", "1", "--gpu-memory", "0.001")
    assert rc == 1 and "rank 0 (pipeline stage 0) needs" in err, err
    assert "more than --gpu-memory 0.001" in err and "Traceback" not in err
    assert glm_pretrain("--world-size", "1", "--gpu-memory", "1")[0] == 0


PLAN = [
    "--num-layers",
    "4",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--vocab-size",
    "1500",
    "--seq-length",
    "128",
    "--global-batch-size",
    "8",
    "--nodes",
    "1",
    "--gpus-per-node",
    "2",
    "--device",
    "cpu",
    "--precision",
    "fp32",
    "--attention-impl",
    "sdpa",
    "--reserve",
    "1",
]


def test_glm_plan_verify_recommends_only_what_fits_when_dry_run(capsys):
    from megatron_glm.plan.cli import main
    from megatron_glm.plan.search import GiB

    assert main([*PLAN, "--json", "--top", "1"]) == 0
    top = json.loads(capsys.readouterr().out)[0]
    # room for the best layout's estimate, but not for the few per cent more that the dry run traces
    gpu_memory = 1 + top["peak_bytes"] * 1.005 / GiB
    rc = main([*PLAN, "--gpu-memory", repr(gpu_memory), "--verify", "3"])
    out, err = capsys.readouterr()
    rows = out.split("beside the estimates, per-GPU peak:\n")[1].split("\n\n")[0].splitlines()[2:]
    verified = [(line[:44].strip(), line.split()[-1]) for line in rows]
    assert len(verified) == 3 and verified[0][1] == "NO", out
    fitting = [name for name, fits in verified if fits == "yes"]
    if fitting:  # the recommendation is the best layout that fits when dry-run
        assert rc == 0
        tp, pp = fitting[0].split()[:2]
        recommended = out.split("glm-pretrain flags")[1]
        assert f"--tensor-model-parallel-size {tp[2:]} --pipeline-model-parallel-size {pp[2]}" in (
            recommended
        )
    else:
        assert rc == 2 and "none of the 3 best layouts fits when dry-run" in err
