"""No command runs code hidden in a checkpoint, and a corrupt one gets one clear line.

Every command that reads a checkpoint is given a folder where one file was replaced by a
pickle that would ``touch`` a marker file; the marker must not appear. The same file with
``--trust-checkpoint`` does run (that proves the bait is live, so the refusals mean something).
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_glm.convert.cli import main as convert
from tests.helpers import thudm_checkpoint, tree_md5


class _Touch:
    """Unpickles as ``os.system("touch MARKER")``: the shape of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison(path, marker):
    """Replace a torch file by one holding the same object plus the bait (so only the bait is wrong)."""
    obj = torch.load(path, weights_only=False)
    obj = (
        {**obj, "payload": _Touch(marker)}
        if isinstance(obj, dict)
        else {"module": obj, "payload": _Touch(marker)}
    )
    torch.save(obj, path)


def pretrain_args(data, load, iters, extra=()):
    prefix, model = data
    return [
        "--data-path",
        prefix,
        "--tokenizer-model",
        model,
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "64",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        str(iters),
        "--lr",
        "1e-3",
        "--split",
        "100,0,0",
        "--zero-stage",
        "1",
        "--lr-decay-iters",
        "2",  # one lr schedule for the 2-iteration checkpoint and its 3-iteration resumes
        "--load",
        load,
        "--save",
        load,
        "--data-cache-path",
        os.path.join(os.path.dirname(load), "cache"),
        *extra,
    ]


def run_pretrain(argv):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    return subprocess.run(
        [sys.executable, "-m", "megatron_glm.training.pretrain", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data):
    """A ZeRO-1 glm-pretrain checkpoint: model states, optimizer partitions and RNG files."""
    save = str(tmp_path_factory.mktemp("safety") / "ckpt")
    result = run_pretrain(pretrain_args(data, save, 2))
    assert result.returncode == 0, result.stderr[-3000:]
    return save


def copy_with(tmp_path, checkpoint, name, how):
    """A copy of the checkpoint with file ``name`` of its newest iteration changed by ``how(path)``."""
    folder = str(tmp_path / f"ckpt-{name}")
    shutil.copytree(checkpoint, folder)
    tag = open(os.path.join(folder, "latest")).read().strip()
    how(os.path.join(folder, tag, name))
    return folder


def one_clear_line(stderr, *needles):
    assert "Traceback" not in stderr, stderr[-3000:]
    line = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert line, stderr[-3000:]
    for needle in needles:
        assert needle in line[-1], (needle, line[-1])


MODEL, OPTIM, RNG = (
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rng_state_pp00_tp00_dp000.pt",
)


@pytest.mark.parametrize("name", [MODEL, OPTIM, RNG])
@pytest.mark.slow
def test_glm_pretrain_load_refuses_a_malicious_file(tmp_path, data, checkpoint, name):
    marker = tmp_path / "marker"
    folder = copy_with(tmp_path, checkpoint, name, lambda p: poison(p, marker))
    before = tree_md5(folder)
    result = run_pretrain(pretrain_args(data, folder, 3))
    assert result.returncode == 1 and not marker.exists(), result.stderr[-3000:]
    one_clear_line(result.stderr, name, "posix.system", "--trust-checkpoint")
    assert tree_md5(folder) == before, "nothing already written changes"
    if name == MODEL:  # the opt-out loads it: the bait is live
        result = run_pretrain(pretrain_args(data, folder, 3, ["--trust-checkpoint"]))
        assert marker.exists() and result.returncode == 0, result.stderr[-3000:]


def test_glm_pretrain_refuses_a_malicious_converted_checkpoint(tmp_path, data, checkpoint):
    """A glm-convert output is read through another path (this rank's weights before the engine exists)."""
    converted = str(tmp_path / "converted")
    assert convert(["reshard", "--load", checkpoint, "--save", converted]) == 0
    marker = tmp_path / "marker"
    poison(
        os.path.join(converted, open(os.path.join(converted, "latest")).read().strip(), MODEL),
        marker,
    )
    before = tree_md5(converted)
    result = run_pretrain(pretrain_args(data, converted, 3))
    assert result.returncode == 1 and not marker.exists(), result.stderr[-3000:]
    one_clear_line(result.stderr, MODEL, "posix.system", "--trust-checkpoint")
    assert tree_md5(converted) == before


@pytest.mark.slow
def test_glm_pretrain_load_names_a_corrupt_file(tmp_path, data, checkpoint):
    def truncate(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    folder = copy_with(tmp_path, checkpoint, MODEL, truncate)
    result = run_pretrain(pretrain_args(data, folder, 3))
    assert result.returncode == 1
    one_clear_line(result.stderr, MODEL, "truncated, corrupt or not a torch file")

    folder = copy_with(
        tmp_path / "meta", checkpoint, "meta.json", lambda p: open(p, "wb").write(os.urandom(300))
    )
    result = run_pretrain(pretrain_args(data, folder, 3))
    assert result.returncode == 1
    one_clear_line(result.stderr, "meta.json is corrupt")


@pytest.mark.slow
def test_glm_generate_refuses_a_malicious_file(tmp_path, checkpoint):
    marker = tmp_path / "marker"
    folder = copy_with(tmp_path, checkpoint, MODEL, lambda p: poison(p, marker))
    cmd = [
        sys.executable,
        "-m",
        "megatron_glm.generate",
        "--load",
        folder,
        "--text",
        "a [MASK] b",
        "--max-new-tokens",
        "2",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and not marker.exists()
    one_clear_line(result.stderr, MODEL, "--trust-checkpoint")
    result = subprocess.run(
        cmd + ["--trust-checkpoint"], capture_output=True, text=True, timeout=300
    )
    assert marker.exists() and result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("command", ["reshard", "export-hf", "zero-to-fp32"])
def test_glm_convert_refuses_a_malicious_checkpoint(tmp_path, checkpoint, command, capsys):
    marker = tmp_path / "marker"
    folder = copy_with(
        tmp_path,
        checkpoint,
        OPTIM if command == "zero-to-fp32" else MODEL,
        lambda p: poison(p, marker),
    )
    out = tmp_path / "out"
    assert convert([command, "--load", folder, "--save", str(out)]) == 1
    assert not marker.exists() and not out.exists()
    one_clear_line(
        capsys.readouterr().err, "posix.system", "--trust-checkpoint", "nothing was written"
    )


@pytest.mark.parametrize("as_file", [False, True])
def test_import_thudm_refuses_a_malicious_checkpoint(tmp_path, capsys, as_file):
    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel

    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=64,
    )
    thudm_checkpoint(tmp_path / "glm", GLMModel(cfg), mp=1)
    marker = tmp_path / "marker"
    path = tmp_path / "glm" / "1000" / "mp_rank_00_model_states.pt"
    poison(path, marker)
    argv = [
        "import-thudm",
        "--load",
        str(path if as_file else tmp_path / "glm"),
        "--save",
        str(tmp_path / "out"),
        "--num-attention-heads",
        "4",
    ]
    assert convert(argv) == 1 and not marker.exists()
    one_clear_line(
        capsys.readouterr().err, "mp_rank_00_model_states.pt", "posix.system", "--trust-checkpoint"
    )
    assert convert(argv + ["--trust-checkpoint"]) == 0 and marker.exists()


def test_any_garbage_is_named_corrupt_never_a_traceback(tmp_path, checkpoint):
    """Random bytes of many sizes and a real file cut at many points: each is one CorruptCheckpointError."""
    import random

    from megatron_glm import serialization

    real = open(
        os.path.join(checkpoint, open(os.path.join(checkpoint, "latest")).read().strip(), MODEL),
        "rb",
    ).read()
    rng = random.Random(0)
    samples = [rng.randbytes(rng.choice([1, 7, 64, 512, 4096, 65536])) for _ in range(60)]
    samples += [real[:n] for n in sorted(rng.sample(range(1, len(real)), 40))]
    samples += [
        bytes([b ^ 0xFF]) + real[1:] for b in real[:1]
    ]  # a flipped first byte: not a zip any more
    path = tmp_path / "garbage.pt"
    for data in samples:
        path.write_bytes(data)
        with pytest.raises(
            serialization.CorruptCheckpointError, match="truncated, corrupt or not a torch file"
        ):
            serialization.load(path)


def test_glm_convert_names_corrupt_inputs(tmp_path, checkpoint, capsys):
    folder = copy_with(tmp_path, checkpoint, MODEL, lambda p: open(p, "wb").write(os.urandom(4096)))
    out = tmp_path / "out"
    assert convert(["reshard", "--load", folder, "--save", str(out)]) == 1
    one_clear_line(capsys.readouterr().err, MODEL, "truncated, corrupt or not a torch file")

    hf = tmp_path / "hf"
    assert convert(["export-hf", "--load", checkpoint, "--save", str(hf)]) == 0
    capsys.readouterr()
    with open(hf / "model.safetensors", "wb") as f:
        f.write(os.urandom(2048))
    assert convert(["import-hf", "--load", str(hf), "--save", str(out)]) == 1
    one_clear_line(capsys.readouterr().err, "model.safetensors", "not a readable safetensors file")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "latest_checkpointed_iteration.txt").write_text("1000")
    assert (
        convert(
            ["import-thudm", "--load", str(empty), "--save", str(out), "--num-attention-heads", "4"]
        )
        == 1
    )
    one_clear_line(capsys.readouterr().err, "holds no mp_rank_XX_model_states.pt")
    assert not out.exists()


def test_the_allow_list_reads_every_file_deepspeed_writes(checkpoint):
    """Our own files need nothing beyond the list, so nobody is pushed towards --trust-checkpoint."""
    from megatron_glm import serialization

    tag = open(os.path.join(checkpoint, "latest")).read().strip()
    names = sorted(n for n in os.listdir(os.path.join(checkpoint, tag)) if n.endswith(".pt"))
    assert {MODEL, OPTIM, RNG} <= set(names)
    for name in names:
        path = os.path.join(checkpoint, tag, name)
        safe, trusted = serialization.load(path), torch.load(path, weights_only=False)
        assert safe.keys() == trusted.keys(), name


def test_check_finite_finds_one_bad_value_in_every_float_dtype():
    """Exact: one NaN or Inf among finite values is found; finite values whose sum would overflow pass."""
    import torch

    from megatron_glm.serialization import NonFiniteWeightsError, check_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
        big[::2] = -big[::2]
        check_finite([("big", big), ("ids", torch.arange(5))], "x")
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = big.clone()
            bad[777] = value
            with pytest.raises(
                NonFiniteWeightsError, match=r"x: 1 tensor holds NaN or Inf \(bad\)"
            ):
                check_finite([("big", big), ("bad", bad)], "x")
