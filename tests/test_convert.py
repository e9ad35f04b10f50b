"""glm-convert: reshards, imports and exports give the same weights and logits; bad input writes nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_glm import checkpoint as ckpt
from megatron_glm.checkpoint import load_model_weights
from megatron_glm.config import ModelConfig
from megatron_glm.convert.cli import main as convert
from megatron_glm.model.glm import GLMModel
from tests.helpers import free_port, thudm_checkpoint, zero_consolidation


def pretrain_args(data, save, iters=2, extra=()):
    prefix, model = data
    return [
        "--data-path",
        prefix,
        "--tokenizer-model",
        model,
        "--num-layers",
        "4",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "4",
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
        "--log-interval",
        "1",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--save",
        save,
        "--data-cache-path",
        os.path.join(os.path.dirname(save), "cache"),
        *extra,
    ]


def pretrain(argv, nproc=1):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    launcher = (
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
        ]
        if nproc > 1
        else []
    )
    result = subprocess.run(
        [sys.executable, *launcher, "-m", "megatron_glm.training.pretrain", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory, data):
    save = str(tmp_path_factory.mktemp("tp2pp2") / "ckpt")
    pretrain(
        pretrain_args(
            data,
            save,
            extra=["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
        ),
        nproc=4,
    )
    return save


def logits_of(state, cfg):
    torch.manual_seed(0)
    model = GLMModel(cfg).eval()
    model.load_state_dict(state)
    tokens = torch.randint(0, 100, (2, 24))
    pos = torch.stack(
        [torch.arange(24).clamp(max=16), (torch.arange(24) - 15).clamp(min=0)]
    ).expand(2, 2, 24)
    lo = torch.zeros(2, 24, dtype=torch.int32)
    hi = torch.maximum(torch.tensor(16), torch.arange(24) + 1).to(torch.int32).expand(2, 24)
    with torch.no_grad():
        return model(tokens, pos, lo, hi)


def shards(folder):
    tag = open(os.path.join(folder, "latest")).read().strip()
    return {
        f: torch.load(os.path.join(folder, tag, f), weights_only=True)["module"]
        for f in sorted(os.listdir(os.path.join(folder, tag)))
        if f.startswith("mp_rank")
    }


def test_reshard_tp2pp2_to_one_and_back_is_exact(tmp_path, tp2pp2):
    original, meta = load_model_weights(tp2pp2)
    cfg = ModelConfig.from_dict(meta["model"])
    one = str(tmp_path / "one")
    assert convert(["reshard", "--load", tp2pp2, "--save", one]) == 0
    merged, one_meta = load_model_weights(one)
    assert one_meta["tensor_model_parallel_size"] == 1 and one_meta["weights_only"]
    assert merged.keys() == original.keys()
    for name in original:
        assert torch.equal(merged[name], original[name]), name
    torch.testing.assert_close(logits_of(merged, cfg), logits_of(original, cfg), rtol=0, atol=0)

    back = str(tmp_path / "back")  # parameters filled into the four files by two processes
    assert (
        convert(
            ["reshard", "--load", one, "--save", back, "--target-tp", "2", "--target-pp", "2"]
            + ["--workers", "2"]
        )
        == 0
    )
    a, b = shards(tp2pp2), shards(back)
    assert a.keys() == b.keys() == {f"mp_rank_0{i}_model_states.pt" for i in range(4)}
    for f in a:  # every rank's file holds exactly what glm-pretrain's rank saved
        assert a[f].keys() == b[f].keys(), f
        for name in a[f]:
            assert torch.equal(a[f][name], b[f][name]), (f, name)

    virtual = str(tmp_path / "virtual")  # and through an interleaved layout
    assert (
        convert(
            [
                "reshard",
                "--load",
                back,
                "--save",
                virtual,
                "--target-pp",
                "2",
                "--target-num-layers-per-virtual-pipeline-stage",
                "1",
            ]
        )
        == 0
    )
    assert (
        "0.transformer.layers.0.attention.query_key_value.weight"
        in shards(virtual)["mp_rank_00_model_states.pt"]
    )
    again, _ = load_model_weights(virtual)
    assert all(torch.equal(again[n], original[n]) for n in original)


@pytest.mark.slow
def test_converted_checkpoint_resumes_in_glm_pretrain(tmp_path, data, tp2pp2):
    one = str(tmp_path / "one")
    assert convert(["reshard", "--load", tp2pp2, "--save", one]) == 0
    result = pretrain(pretrain_args(data, one, iters=3, extra=["--load", one]))
    out = result.stdout + result.stderr
    assert f"resumed from {one}/iter_0000002 at iteration 2 (converted weights" in out
    records = [json.loads(line) for line in open(os.path.join(one, "metrics.jsonl"))]
    assert [r["iteration"] for r in records] == [3]


def test_export_hf_and_import_back(tmp_path, tp2pp2):
    original, meta = load_model_weights(tp2pp2)
    hf = str(tmp_path / "hf")
    assert convert(["export-hf", "--load", tp2pp2, "--save", hf]) == 0
    config = json.load(open(os.path.join(hf, "config.json")))
    assert config["model_type"] == "megatron_glm" and config["num_layers"] == 4
    with (
        open(meta["tokenizer"]["files"][0], "rb") as a,
        open(os.path.join(hf, "tokenizer.model"), "rb") as b,
    ):
        assert a.read() == b.read(), "the export carries the tokenizer"
    from safetensors.torch import load_file

    exported = load_file(os.path.join(hf, "model.safetensors"))
    assert all(torch.equal(exported[n], original[n]) for n in original)

    back = str(tmp_path / "back")
    assert convert(["import-hf", "--load", hf, "--save", back, "--target-tp", "2"]) == 0
    merged, back_meta = load_model_weights(back)
    assert back_meta["tokenizer"]["files"][0].startswith(hf), (
        "the tokenizer now lives in the export folder"
    )
    assert all(torch.equal(merged[n], original[n]) for n in original)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_import_original_glm_checkpoint_gives_its_logits(tmp_path, legacy):
    """Memory-mapped per parameter; files in torch's format before 1.6 are read whole."""
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(3)
    model = GLMModel(cfg)
    thudm_checkpoint(tmp_path / "glm", model, mp=2, legacy=legacy)
    out = str(tmp_path / "imported")
    assert (
        convert(
            [
                "import-thudm",
                "--load",
                str(tmp_path / "glm"),
                "--save",
                out,
                "--num-attention-heads",
                "4",
            ]
        )
        == 0
    )
    state, meta = load_model_weights(out)
    assert ModelConfig.from_dict(meta["model"]).architecture_differences(cfg) == []
    torch.testing.assert_close(
        logits_of(state, cfg), logits_of(model.state_dict(), cfg), rtol=0, atol=0
    )


def test_bad_input_is_named_and_nothing_is_written(tmp_path, tp2pp2, capsys):
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=64,
    )
    model = GLMModel(cfg)
    thudm_checkpoint(tmp_path / "glm", model, mp=1)
    f = tmp_path / "glm" / "1000" / "mp_rank_00_model_states.pt"
    sd = torch.load(f, weights_only=False)  # the test's own file
    del sd["module"]["module.transformer.layers.1.mlp.dense_4h_to_h.bias"]
    sd["module"]["module.transformer.layers.0.attention.dense.weight"] = torch.zeros(32, 16)
    sd["module"]["module.lm_head.weight"] = torch.zeros(3)
    torch.save(sd, f)
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    sound = tmp_path / "sound"
    thudm_checkpoint(sound, GLMModel(cfg), mp=1)
    cases = [
        (
            [
                "import-thudm",
                "--load",
                str(tmp_path / "glm"),
                "--save",
                str(out),
                "--num-attention-heads",
                "4",
            ],
            [
                "missing 1: transformer.layers.1.mlp.dense_4h_to_h.bias",
                "unexpected 1: lm_head.weight",
                "transformer.layers.0.attention.dense.weight: (32, 16) != (32, 32)",
            ],
        ),
        (
            ["import-thudm", "--load", str(tmp_path / "glm"), "--save", str(out)],
            ["--num-attention-heads or --preset"],
        ),
        (["reshard", "--load", str(empty), "--save", str(out)], ["is an empty folder"]),
        (
            ["reshard", "--load", tp2pp2, "--save", str(out), "--target-tp", "3"],
            ["--target-tp 3 does not divide 4 attention heads"],
        ),
        (
            ["reshard", "--load", tp2pp2, "--save", str(out), "--target-pp", "3"],
            ["impossible target layout"],
        ),
        (
            [
                "import-thudm",
                "--load",
                str(empty),
                "--save",
                str(out),
                "--num-attention-heads",
                "4",
            ],
            ["holds no mp_rank_XX_model_states.pt"],
        ),
        (
            [
                "import-thudm",
                "--load",
                str(sound),
                "--save",
                str(out),
                "--num-attention-heads",
                "5",
            ],
            ["heads"],
        ),
        (
            ["import-thudm", "--load", str(sound), "--save", str(out), "--preset", "glm-large"],
            [
                "--preset glm-large does not describe",
                "num_layers 24 (the weights have 2)",
                "hidden_size 1024 (the weights have 32)",
            ],
        ),
    ]
    for argv, messages in cases:
        assert convert(argv) == 1, argv
        err = capsys.readouterr().err
        for m in messages:
            assert m in err, (m, err)
        assert (
            "nothing was written" in err
            and not out.exists()
            and not (tmp_path / "out.partial").exists()
        )

    existing = tmp_path / "existing"
    existing.mkdir()
    assert convert(["reshard", "--load", tp2pp2, "--save", str(existing)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err and os.listdir(existing) == []
    assert (
        convert(["reshard", "--load", tp2pp2, "--save", str(out), "--target-tp", "2", "--dry-run"])
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "mp_rank_01_model_states.pt" in printed
        and "would write 4 files" in printed
        and not out.exists()
    )


@pytest.mark.slow
def test_zero_checkpoints_consolidate_to_the_weights(tmp_path, data):
    """ZeRO-1 (whole weights beside the partitions) and ZeRO-3 (partitions only) -> the fp32 weights."""
    runs = {}
    for stage in (1, 3):
        save = str(tmp_path / f"zero{stage}" / "ckpt")
        pretrain(pretrain_args(data, save, extra=["--zero-stage", str(stage)]))
        runs[stage] = save
    whole, meta = load_model_weights(runs[1])
    cfg = ModelConfig.from_dict(meta["model"])
    for stage, save in runs.items():
        out = str(tmp_path / f"fp32-{stage}")
        assert convert(["zero-to-fp32", "--load", save, "--save", out]) == 0
        state, _ = load_model_weights(out)
        assert state.keys() == whole.keys() and all(
            v.dtype == torch.float32 for v in state.values()
        )
        # streamed parameter by parameter: bitwise what DeepSpeed's zero_to_fp32 gives
        folder, tag = ckpt.locate(save)
        reference = zero_consolidation(folder, tag, ckpt.read_meta(folder, tag))
        assert all(torch.equal(state[name], reference[name]) for name in whole)
        # ZeRO stages agree (tests/test_3d.py); consolidation must not lose or mix anything
        for name in whole:
            torch.testing.assert_close(state[name], whole[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(logits_of(state, cfg), logits_of(whole, cfg), atol=1e-4, rtol=1e-4)
