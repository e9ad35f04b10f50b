"""A user's mistake gets one clear line naming the problem and the fix, and loses nothing already written."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from megatron_glm.generate import main as generate
from megatron_glm.plan.cli import main as plan
from tests.helpers import records, tree_md5


def pretrain_args(data, save, iters, extra=()):
    prefix, model = data
    return [
        "--data-path",
        prefix,
        "--tokenizer-model",
        model,
        "--num-layers",
        "1",
        "--hidden-size",
        "16",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "1",
        "--train-iters",
        str(iters),
        "--split",
        "100,0,0",
        "--log-interval",
        "1",
        "--save",
        save,
        "--data-cache-path",
        os.path.join(os.path.dirname(save), "cache"),
        *extra,
    ]


def run_pretrain(argv, **kw):
    return subprocess.run(
        [sys.executable, "-m", "megatron_glm.training.pretrain", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def one_line(stderr, *needles):
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpu-memory", "0"], "--gpu-memory 0.0 must be positive"),
        (["--gpu-memory", "-8"], "--gpu-memory -8.0 must be positive"),
        (["--gpu-memory", "nan"], "--gpu-memory nan must be positive"),
        (["--efficiency", "0"], "--efficiency 0.0 must be positive"),
        (["--global-batch-size", "0"], "--global-batch-size 0 must be positive"),
        (["--global-batch-size", "-64"], "--global-batch-size -64 must be positive"),
        (["--micro-batch-sizes", "0", "1"], "--micro-batch-sizes and --top must be positive"),
        (["--seq-length", "0"], "--seq-length 0 must be positive"),
        (["--reserve", "80"], "--reserve 80 GiB leaves nothing"),
    ],
)
def test_glm_plan_refuses_impossible_numbers(argv, message, capsys):
    assert (
        plan(["--preset", "glm-large", "--seq-length", "512", "--global-batch-size", "64", *argv])
        == 1
    )
    one_line(capsys.readouterr().err, message)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1"], "--temperature -1.0 must be positive"),
        (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
        (["--num-beams", "0", "--strategy", "beam"], "--num-beams 0 must be at least 1"),
    ],
)
def test_glm_generate_refuses_impossible_sampling(tmp_path, argv, message, capsys):
    assert generate(["--load", str(tmp_path), "--text", "a [MASK] b", *argv]) == 1
    one_line(capsys.readouterr().err, message)


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the check is for machines without CUDA"
)
def test_device_cuda_without_cuda(tmp_path, data, capsys):
    with pytest.raises(SystemExit):
        generate(["--load", str(tmp_path), "--text", "a [MASK] b", "--device", "cuda"])
    assert "no CUDA GPU" in capsys.readouterr().err
    result = run_pretrain(pretrain_args(data, str(tmp_path / "ckpt"), 1, ["--device", "cuda"]))
    assert result.returncode == 1
    one_line(result.stderr, "--device cuda, but no CUDA GPU is visible", "--device cpu")


def test_abbreviated_flags_are_refused(tmp_path, data):
    result = run_pretrain(["--data-path", data[0], "--train-iters", "1", "--train-iter", "3"])
    assert result.returncode == 2 and "unrecognized arguments: --train-iter 3" in result.stderr


def test_a_save_folder_that_cannot_be_written(tmp_path, data):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    result = run_pretrain(pretrain_args(data, str(blocker / "ckpt"), 1))
    assert result.returncode == 1
    one_line(
        result.stderr,
        f"--save {blocker}/ckpt: cannot write there",
        "choose a folder you can write to",
    )
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["sync", "async"])
@pytest.mark.slow
def test_a_save_that_fails_half_way_names_the_latest_good_checkpoint(tmp_path, data, mode):
    """Writes past 64 KB fail (RLIMIT_FSIZE, as a full disk does for torch's zip writer); the first save is kept.
    A background write's failure ends the run the same way, at the end of the run that waited for it."""
    save = str(tmp_path / "ckpt")
    assert run_pretrain(pretrain_args(data, save, 2, ["--lr-decay-iters", "4"])).returncode == 0

    def small_files():
        # the write fails with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    result = run_pretrain(
        pretrain_args(data, save, 4, ["--save-interval", "2", "--lr-decay-iters", "4", *mode]),
        preexec_fn=small_files,
    )
    assert result.returncode == 1
    one_line(
        result.stderr,
        "saving iter_0000004",
        "failed",
        f"latest complete checkpoint is {save}/iter_0000002",
    )
    assert sorted(n for n in os.listdir(save) if not n.endswith(".jsonl")) == [
        ".lock",
        "iter_0000002",
        "latest",
    ]
    assert open(os.path.join(save, "latest")).read() == "iter_0000002"


def test_ctrl_c_saves_after_the_step_and_exits_130(tmp_path, data):
    save = str(tmp_path / "ckpt")
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_glm.training.pretrain", *pretrain_args(data, save, 10)],
        env={**os.environ, "MEGATRON_GLM_FAULT": "hold:1"},  # waits after step 1 for the signal
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        # inside the loop
        while not (os.path.exists(os.path.join(save, "metrics.jsonl")) and records(save)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][
                -3000:
            ]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert (
        "stopping after iteration 1 (SIGINT): saved" in out
        and "run the same command to resume" in out
    )
    assert (
        records(save)[-1]["iteration"] == 1
        and open(os.path.join(save, "latest")).read() == "iter_0000001"
    )


def test_a_corrupt_tokenizer_model_is_named(tmp_path, corpus, capsys):
    from megatron_glm.data_prep.preprocess import main as preprocess

    bad = tmp_path / "spm.model"
    bad.write_bytes(os.urandom(1000))
    assert (
        preprocess(
            [
                "--input",
                corpus[0],
                "--output-prefix",
                str(tmp_path / "out"),
                "--tokenizer-model",
                str(bad),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 1
    )
    one_line(capsys.readouterr().err, f"{bad} is not a sentencepiece model", "corrupt")
    assert sorted(os.listdir(tmp_path)) == ["spm.model"]


def test_glm_convert_into_a_folder_it_cannot_write(tmp_path, capsys):
    from megatron_glm.config import ModelConfig
    from megatron_glm.convert.cli import main as convert
    from megatron_glm.model.glm import GLMModel
    from tests.helpers import thudm_checkpoint

    cfg = ModelConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        vocab_size=128,
        max_position_embeddings=32,
    )
    thudm_checkpoint(tmp_path / "glm", GLMModel(cfg), mp=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert (
        convert(
            [
                "import-thudm",
                "--load",
                str(tmp_path / "glm"),
                "--save",
                str(blocker / "out"),
                "--num-attention-heads",
                "2",
            ]
        )
        == 1
    )
    one_line(capsys.readouterr().err, "a-file", "nothing was written")
    assert blocker.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["a-file", "glm"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished 2-iteration run saved at both iterations, and a tree of wrong --load paths beside it."""
    root = tmp_path_factory.mktemp("load")
    save = str(root / "ckpt")
    assert run_pretrain(pretrain_args(data, save, 2, ["--save-interval", "1"])).returncode == 0
    (root / "empty").mkdir()
    (root / "interrupted" / ".tmp-iter_0000003").mkdir(parents=True)
    (root / "thudm" / "1000").mkdir(parents=True)
    (root / "thudm" / "1000" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (root / "logged").mkdir()
    (root / "logged" / "metrics.jsonl").write_text("")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("x")
    return root, save


@pytest.mark.parametrize(
    "where, message",
    [
        ("ckpt-typo", "does not exist"),
        ("empty", "is an empty folder"),
        ("ckpt/latest", "is the latest file of a checkpoint folder: pass the folder, {root}/ckpt"),
        ("interrupted", "holds no complete checkpoint"),
        ("logged", "holds no checkpoint yet: the run that logged there saved none"),
        ("thudm", "is an original GLM checkpoint: import it first (glm-convert import-thudm"),
        ("other", "holds no megatron-glm checkpoint (iter_*/meta.json); it holds notes.txt"),
    ],
)
def test_a_load_that_holds_no_checkpoint_is_refused(finished, data, where, message, capsys):
    """An explicit --load never means "start from scratch": glm-pretrain, glm-eval, glm-convert and glm-generate
    all name what is there instead (in-process here; the command line's exit code is the test below)."""
    from megatron_glm.checkpoint import CheckpointError, find_resume
    from megatron_glm.convert.cli import main as convert
    from megatron_glm.evaluate import main as evaluate

    root, _ = finished
    path = str(root / where)
    message = message.format(root=root)
    with pytest.raises(CheckpointError) as e:
        find_resume(path, str(root / "new"), None, None)
    assert str(e.value).startswith(f"{path} {message}")
    if where == "thudm":
        return  # glm-convert reads it (import-thudm), glm-eval says to import it first: tested with the importer
    assert convert(["reshard", "--load", path, "--save", str(root / "out")]) == 1
    one_line(capsys.readouterr().err, message)
    assert evaluate(["--load", path, "--lm-samples", "1"]) == 1
    one_line(capsys.readouterr().err, message)
    assert generate(["--load", path, "--text", "a [MASK] b"]) == 1
    one_line(capsys.readouterr().err, message)
    assert not os.path.exists(root / "out") and not os.path.exists(root / "new")


def test_a_mistyped_load_stops_glm_pretrain_and_an_iteration_folder_is_that_iteration(
    finished, data
):
    root, save = finished
    before = tree_md5(save)
    new = str(root / "new-run")
    result = run_pretrain(pretrain_args(data, new, 4, ["--load", save + "-typo"]))
    assert result.returncode == 1
    one_line(result.stderr, f"{save}-typo does not exist")
    assert not os.path.exists(new)

    # glm-pretrain, glm-eval and glm-convert take one iteration folder as that iteration (not as an original GLM
    # checkpoint, which is what glm-eval and glm-convert called it)
    result = run_pretrain(
        pretrain_args(
            data,
            new,
            3,
            [
                "--load",
                os.path.join(save, "iter_0000001"),
                "--lr-decay-iters",
                "2",
                "--eval-interval",
                "2",
            ],
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {save}/iter_0000001 at iteration 1" in result.stdout
    # --split 100,0,0 (these tests' split) with validation due: said once, not skipped silently
    assert result.stdout.count("--split 100,0,0 leaves no validation data") == 1
    assert [r["iteration"] for r in records(new)] == [2, 3]
    from megatron_glm.convert.sources import MegatronGLM, detect_format

    assert detect_format(os.path.join(save, "iter_0000001")) == "megatron-glm"
    assert MegatronGLM(os.path.join(save, "iter_0000001")).info["iteration"] == 1
    assert tree_md5(save) == before


@pytest.mark.slow
def test_a_second_run_on_one_save_is_refused_and_a_dead_holder_blocks_nothing(tmp_path, data):
    """Run A saves iterations 1 and 2 and holds (alive); run B on the same --save is refused, naming A, and
    changes nothing. Once A is killed (-9: no clean-up of its own), B runs there."""
    save = str(tmp_path / "c")
    argv = pretrain_args(data, save, 4, ["--save-interval", "1"])
    first = subprocess.Popen(
        [sys.executable, "-m", "megatron_glm.training.pretrain", *argv],
        env={**os.environ, "MEGATRON_GLM_FAULT": "hold:2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        latest = os.path.join(save, "latest")
        while not (os.path.exists(latest) and open(latest).read() == "iter_0000002"):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][
                -3000:
            ]
            time.sleep(0.2)
        before = tree_md5(save)
        second = run_pretrain([*argv, "--seed", "999"])
        assert second.returncode == 1
        one_line(
            second.stderr,
            f"--save {save} is in use by another run",
            f"pid {first.pid}",
            "another --save",
        )
        assert tree_md5(save) == before
    finally:
        first.kill()
        first.communicate()
    second = run_pretrain([*argv, "--seed", "999"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from {save}/iter_0000002" in second.stdout
    assert [r["iteration"] for r in records(save)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_resume_on_another_lr_schedule_is_refused_unless_a_flag_says_which_wins(tmp_path, data):
    """Megatron's rule and its two flags. The oracles are uninterrupted runs: the original one, and one trained
    from the start with the new flags (the rate depends on the step alone, not on the weights)."""

    def lrs(folder, first):
        return [r["lr"] for r in records(folder) if r["iteration"] >= first]

    original, fresh = str(tmp_path / "original"), str(tmp_path / "fresh")
    assert (
        run_pretrain(
            pretrain_args(data, original, 8, ["--lr", "1e-3", "--save-interval", "4"])
        ).returncode
        == 0
    )
    assert run_pretrain(pretrain_args(data, fresh, 8, ["--lr", "1e-2"])).returncode == 0
    load = ["--load", os.path.join(original, "iter_0000004")]
    before = tree_md5(original)

    for i, (change, message) in enumerate(
        [
            (
                ["--train-iters", "12"],
                "--lr-decay-iters (default --train-iters) gives 12, the checkpoint 8",
            ),
            (["--lr", "1e-2"], "--lr gives 0.01, the checkpoint 0.001"),
            (
                ["--lr-decay-style", "constant"],
                "--lr-decay-style gives constant, the checkpoint cosine",
            ),
        ]
    ):
        result = run_pretrain(
            pretrain_args(data, str(tmp_path / f"refused{i}"), 8, ["--lr", "1e-3", *load, *change])
        )
        assert result.returncode == 1
        one_line(
            result.stderr,
            "was trained on another lr schedule",
            message,
            "--use-checkpoint-opt_param-scheduler",
            "--override-opt_param-scheduler follows the flags' from iteration 4 on",
        )
        assert not os.path.exists(tmp_path / f"refused{i}")

    same = str(tmp_path / "same")
    assert run_pretrain(pretrain_args(data, same, 8, ["--lr", "1e-3", *load])).returncode == 0
    assert lrs(same, 5) == lrs(original, 5)

    switched = str(tmp_path / "switched")
    result = run_pretrain(
        pretrain_args(data, switched, 8, ["--lr", "1e-2", "--override-opt_param-scheduler", *load])
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert lrs(switched, 5) == lrs(fresh, 5) and lrs(fresh, 5) != lrs(original, 5)
    assert (
        json.load(open(os.path.join(switched, "iter_0000008", "meta.json")))["lr_schedule"]["lr"]
        == 1e-2
    )

    kept = str(tmp_path / "kept")
    result = run_pretrain(
        pretrain_args(
            data, kept, 12, ["--lr", "1e-2", "--use-checkpoint-opt_param-scheduler", *load]
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # then the checkpoint's schedule ends at --min-lr (0)
    assert lrs(kept, 5)[:4] == lrs(original, 5)
    assert (
        json.load(open(os.path.join(kept, "iter_0000012", "meta.json")))["lr_schedule"]["lr"]
        == 1e-3
    )
    assert tree_md5(original) == before


@pytest.mark.slow
def test_ranks_stop_without_saving_when_torchrun_is_killed(tmp_path, data):
    """kill -9 of torchrun's agent: its ranks, held after step 1 (they would train on), leave; nothing is saved."""
    import psutil

    from tests.helpers import free_port

    save = str(tmp_path / "ckpt")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "megatron_glm.training.pretrain",
            *pretrain_args(data, save, 20, ["--save-interval", "5"]),
        ],
        env={**os.environ, "MEGATRON_GLM_FAULT": "hold:1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (os.path.exists(os.path.join(save, "metrics.jsonl")) and records(save)):
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0][
                -3000:
            ]
            time.sleep(0.2)
        ranks = psutil.Process(agent.pid).children()
        assert len(ranks) == 2
        agent.kill()
        _, alive = psutil.wait_procs(ranks, timeout=120)
        assert alive == [], "ranks went on after their launcher died"
        output = agent.communicate()[0]  # the ranks held the pipe's write end: it closes with them
    finally:
        agent.kill()
        for rank in psutil.Process().children(recursive=True):
            rank.kill()
    assert (
        output.count("the launcher that started this rank") >= 1
        and "stopping without saving" in output
    )
    assert not [n for n in os.listdir(save) if n.startswith("iter_")] and [
        r["iteration"] for r in records(save)
    ] == [1]


def test_a_checkpoint_with_a_nan_weight_is_refused_by_glm_pretrain(finished, data, tmp_path):
    import shutil

    import torch

    _, save = finished
    copy = str(tmp_path / "ckpt")
    shutil.copytree(save, copy, ignore=shutil.ignore_patterns(".lock"))
    model_file = os.path.join(copy, "iter_0000002", "mp_rank_00_model_states.pt")
    states = torch.load(model_file, weights_only=False)
    name = sorted(states["module"])[0]
    states["module"][name].view(-1)[0] = float("nan")
    torch.save(states, model_file)
    before = tree_md5(copy)
    result = run_pretrain(
        pretrain_args(data, str(tmp_path / "new"), 4, ["--load", copy, "--lr-decay-iters", "2"])
    )
    assert result.returncode == 1
    one_line(
        result.stderr,
        f"{copy}/iter_0000002: 1 tensor holds NaN or Inf ({name})",
        "use an earlier checkpoint",
    )
    assert tree_md5(copy) == before


def test_glm_generate_checks_every_stdin_line_before_filling_any(finished, monkeypatch, capsys):
    import io

    _, save = finished
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("first[MASK]line\n\nno mask here\nthird[gMASK]\n")
    )
    assert generate(["--load", save, "--max-new-tokens", "3"]) == 1
    out, err = capsys.readouterr()
    one_line(
        err,
        "2 of 4 prompts cannot be filled, so none was",
        "stdin line 2: the text has no [MASK]",
        "stdin line 3: the text has no [MASK]",
    )
    assert out == ""
    monkeypatch.setattr(sys, "stdin", io.StringIO("first[MASK]line\nthird[gMASK]\n"))
    assert generate(["--load", save, "--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("first") and lines[1].startswith("third")


@pytest.mark.slow
def test_a_nan_loss_names_what_a_rerun_would_resume(finished, data, tmp_path):
    """A run started from another folder's checkpoint that diverges before its first save: --save holds nothing."""
    _, save = finished
    new = str(tmp_path / "new")
    env = {**os.environ, "MEGATRON_GLM_FAULT": "nan_loss:3"}
    result = run_pretrain(
        pretrain_args(data, new, 4, ["--load", save, "--lr-decay-iters", "2"]), env=env
    )
    assert result.returncode == 1
    one_line(
        result.stderr,
        "loss is nan at iteration 3; stopped without saving",
        f"--save {new} holds no checkpoint yet (this run started from {save}/iter_0000002)",
        "Lower --lr",
    )
    result = run_pretrain(
        pretrain_args(
            data, new, 6, ["--load", save, "--lr-decay-iters", "2", "--save-interval", "4"]
        ),
        env={**os.environ, "MEGATRON_GLM_FAULT": "nan_loss:5"},
    )
    assert result.returncode == 1
    one_line(
        result.stderr, "loss is nan at iteration 5", f"the newest checkpoint is {new}/iter_0000004"
    )
    assert sorted(n for n in os.listdir(new) if n.startswith("iter_")) == ["iter_0000004"]
