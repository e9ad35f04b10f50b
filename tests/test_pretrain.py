"""glm-pretrain end to end (real processes): kill anywhere, resume, and get the same losses bitwise."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import records


def args(data, save, iters=8, extra=()):
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
        "--lr-warmup-iters",
        "2",
        "--bert-prob",
        "0.5",
        "--gap-sentence-prob",
        "0.3",
        "--split",
        "90,10,0",
        "--eval-interval",
        "4",
        "--eval-iters",
        "1",
        "--log-interval",
        "2",
        "--save",
        save,
        "--load",
        save,
        "--save-interval",
        "2",
        "--keep-last",
        "2",
        "--data-cache-path",
        os.path.join(os.path.dirname(save), "cache"),
        *extra,
    ]


def run(argv, fault=None):
    env = {**os.environ, "MEGATRON_GLM_FAULT": fault or ""}
    return subprocess.run(
        [sys.executable, "-m", "megatron_glm.training.pretrain", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    clean = str(tmp_path_factory.mktemp("clean") / "ckpt")
    done = run(args(data, clean))
    assert done.returncode == 0, done.stderr
    reference = {r["iteration"]: r for r in records(clean)}
    assert len(reference) == 8 and reference[8]["lm_loss"] < reference[1]["lm_loss"]
    return reference


def assert_killed_runs_match(save, reference):
    seen = records(save)
    assert [r["iteration"] for r in seen] == sorted(reference), "each iteration once, in order"
    with open(
        os.path.join(save, "metrics.replayed.jsonl")
    ) as f:  # the rows of redone iterations, kept
        replayed = [json.loads(line) for line in f]
    assert replayed
    # every record of every attempt matches the uninterrupted run, bit for bit
    for r in seen + replayed:
        ref = reference[r["iteration"]]
        assert r["lm_loss"] == ref["lm_loss"] and r["grad_norm"] == ref["grad_norm"], r["iteration"]
        assert r.get("valid_loss") == ref.get("valid_loss")
    names = sorted(os.listdir(save))
    assert names == [
        ".lock",
        "iter_0000006",
        "iter_0000008",
        "latest",
        "metrics.jsonl",
        "metrics.replayed.jsonl",
    ], "keeps the last 2, no temporaries"


@pytest.mark.slow
def test_kill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, data, uninterrupted):
    """Killed at every dangerous moment of a save, synchronous or --async-save, and between saves; each attempt
    resumes from the newest complete checkpoint, and every record of every attempt is the uninterrupted run's:
    1. sync, all files staged, not renamed; 2. async, the writer killed after its first file (training going on);
    3. async, every file staged; 4. sync, renamed but `latest` not updated; 5. async with each save written only
    after the next step has changed the weights and moments (so the resume from it proves the files hold the host
    copy, not the live state), killed at step 7 with the save of 6 pending; 6. to the end."""
    save = str(tmp_path / "killed" / "ckpt")
    attempts = [
        ("save:staged", []),
        ("async:writing", ["--async-save"]),
        ("save:staged", ["--async-save"]),
        ("save:renamed", []),
        ("async:late,iteration:7", ["--async-save"]),
        (None, ["--async-save"]),
    ]
    for fault, mode in attempts:
        result = run(args(data, save, extra=mode), fault)
        assert result.returncode == (0 if fault is None else -9), result.stderr
        # the first save never completed: nothing to resume from
        if fault in (
            "save:staged",
            "async:writing",
        ):
            assert "latest" not in os.listdir(save) and not [
                n for n in os.listdir(save) if n.startswith("iter_")
            ]
    assert "in the background" in result.stdout
    assert_killed_runs_match(save, uninterrupted)


@pytest.mark.slow
def test_a_checkpoint_of_the_previous_meta_format_resumes_as_if_uninterrupted(
    tmp_path, data, uninterrupted
):
    """A checkpoint whose meta.json records the raw flags (``args``, as every checkpoint before the settings
    sections did, e.g. 4457239's) resumes: its settings are read back from those flags."""
    from megatron_glm.training.arguments import build_parser

    save = str(tmp_path / "ckpt")
    assert run(args(data, save), "iteration:5").returncode == -9  # checkpoints at 2 and 4
    path = os.path.join(save, "iter_0000004", "meta.json")
    with open(path) as f:
        meta = json.load(f)
    for key in ("settings", "global_batch_size", "train_iters"):
        del meta[key]
    flags = vars(build_parser().parse_args(args(data, save)))  # what was recorded: the parsed flags
    meta["args"] = {
        k: v for k, v in flags.items() if isinstance(v, (int, float, str, bool, list, type(None)))
    }
    with open(path, "w") as f:
        json.dump(meta, f)
    result = run(args(data, save))
    assert (
        result.returncode == 0
        and "resumed from" in result.stdout
        and "iteration 4" in result.stdout
    ), result.stderr[-2000:]
    assert_killed_runs_match(save, uninterrupted)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    save = str(tmp_path_factory.mktemp("trained") / "ckpt")
    result = run(args(data, save, iters=2))
    assert result.returncode == 0, result.stderr
    return save


def test_refuses_another_architecture_and_writes_nothing(tmp_path, data, trained):
    save = str(tmp_path / "ckpt")
    shutil.copytree(trained, save)
    before = {n: os.path.getmtime(os.path.join(save, n)) for n in os.listdir(save)}
    wrong = args(data, save, iters=4)
    wrong[wrong.index("--hidden-size") + 1] = "64"
    result = run(wrong)
    assert result.returncode == 1 and "another architecture" in result.stderr
    assert "hidden_size: 32 vs 64" in result.stderr
    assert {n: os.path.getmtime(os.path.join(save, n)) for n in os.listdir(save)} == before


@pytest.mark.parametrize(
    "change, message",
    [
        (("--data-path", "/nonexistent/prefix"), "glm-preprocess"),
        (
            ("--seq-length", "4096", "--max-position-embeddings", "512"),
            "exceeds --max-position-embeddings",
        ),
        (("--global-batch-size", "3"), "not a multiple of --micro-batch-size"),
        (("--num-attention-heads", "3"), "not divisible"),
        (("--fp16", ""), "use --bf16 on CPU"),
        (("--bf16", "", "--fp16", ""), "exclude each other"),
        (
            ("--num-workers", "-1"),
            "--num-workers -1: use 0 (collate in the training process) or more",
        ),
    ],
)
def test_bad_flags_are_named(tmp_path, data, change, message):
    argv = args(data, str(tmp_path / "ckpt"), iters=2)
    for flag, value in zip(change[0::2], change[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value] if value else [flag]
    result = run(argv)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ["--attention-impl", "flex"],
            "--attention-impl flex has no attention dropout: pass --attention-dropout 0",
        ),
        (["--attention-impl", "flex", "--attention-dropout", "0"], "flex trains on GPUs only"),
        (
            ["--optimizer-impl", "apex"],
            "--optimizer-impl apex needs NVIDIA apex, which is not installed here",
        ),
        (["--layernorm-impl", "apex"], "--layernorm-impl apex needs NVIDIA apex"),
        (
            ["--train-samples", "40"],
            "pass one of --train-iters (steps) and --train-samples (samples)",
        ),
        (["--lr-warmup-samples", "8"], "--lr-warmup-samples go with --train-samples"),
        (
            ["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"],
            "both set the warm-up: pass one",
        ),
        (["--clip-grad", "-1"], "--clip-grad -1.0: give a gradient norm >= 0"),
        (["--rampup-batch-size", "2", "2", "8"], "--rampup-batch-size go with --train-samples"),
        (
            ["--no-load-optim", "--load", ""],
            "--finetune, --no-load-optim and --no-load-rng say what to take from --load",
        ),
    ],
)
def test_flags_that_cannot_work_together_are_named_before_any_work(tmp_path, data, change, message):
    """The job's checks (in-process: the same ValueError glm-pretrain prints as its one error line)."""
    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.config import from_args

    with pytest.raises(ValueError, match=re.escape(message)):
        from_args(build_parser().parse_args(args(data, str(tmp_path / "ckpt")) + change), 1)


@pytest.mark.slow
def test_bf16_tensorboard_and_wandb(tmp_path, data):
    """bf16 through the engine tracks fp32 closely; TensorBoard and (offline) wandb get the metrics."""
    fp32 = str(tmp_path / "fp32" / "ckpt")
    assert run(args(data, fp32, iters=4)).returncode == 0
    bf16 = str(tmp_path / "bf16" / "ckpt")
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_glm.training.pretrain",
            *args(
                data,
                bf16,
                iters=4,
                extra=["--bf16", "--tensorboard", "--wandb-project", "glm-test"],
            ),
        ],
        env=env_free,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ours, ref = records(bf16), records(fp32)
    for a, b in zip(ours, ref):
        assert abs(a["lm_loss"] - b["lm_loss"]) < 0.05 * b["lm_loss"], (a, b)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(bf16, "tensorboard"))
    events.Reload()
    logged = [
        e.value for e in events.Scalars("lm loss")
    ]  # Megatron's tags, and its "vs samples" twins
    assert logged == pytest.approx([r["lm_loss"] for r in ours], rel=1e-6)
    by_samples = events.Scalars("lm loss vs samples")
    assert [e.step for e in by_samples] == [r["consumed_samples"] for r in ours]
    assert {"learning-rate", "grad-norm", "batch-size", "loss_token"} <= set(
        events.Tags()["scalars"]
    )
    runs = os.listdir(os.path.join(bf16, "wandb"))
    assert any(name.startswith("offline-run-") for name in runs), runs


@pytest.mark.slow
def test_glm_generate_cli_and_a_mismatched_tokenizer(tmp_path, trained):
    cmd = [
        sys.executable,
        "-m",
        "megatron_glm.generate",
        "--load",
        trained,
        "--max-new-tokens",
        "4",
    ]
    result = subprocess.run(
        cmd
        + ["--text", "Return the [MASK] of the list.", "--strategy", "beam", "--num-beams", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    filled = result.stdout.strip()
    assert (
        filled.startswith("Return the ")
        and filled.endswith(" of the list.")
        and "[MASK]" not in filled
    )
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "word"]) + "\n")
    result = subprocess.run(
        cmd + ["--vocab-file", str(vocab), "--text", "a [MASK] b"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "was trained with another tokenizer" in result.stderr
    assert "drop the tokenizer flags to use its own" in result.stderr
    result = subprocess.run(
        cmd + ["--text", "no blank here"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "no [MASK]" in result.stderr


def test_a_deepspeed_json_overrides_the_flags_it_sets(tmp_path):
    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.config import from_args
    from megatron_glm.training.engine import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "gradient_clipping": 0.5,
                "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000},
            }
        )
    )
    parsed = build_parser().parse_args(
        [
            "--data-path",
            "x",
            "--train-iters",
            "1",
            "--clip-grad",
            "2.0",
            "--zero-stage",
            "0",
            "--deepspeed-config",
            str(path),
        ]
    )
    job = from_args(parsed, world_size=1)
    config = deepspeed_config(job, grad_accum=3)
    assert config["gradient_clipping"] == 0.5 and config["gradient_accumulation_steps"] == 3
    zero = config["zero_optimization"]
    # the JSON's keys win over the flags'
    assert zero["stage"] == 1 and zero["reduce_bucket_size"] == 1000
    # keys the JSON does not set keep the flags' values
    assert zero["allgather_bucket_size"] == 500_000_000
    # the job, and so the banner and meta.json, hold what runs
    assert job.parallel.zero_stage == 1 and job.optimizer.clip_grad == 0.5
    record = job.settings.record()
    assert record["parallel"]["zero_stage"] == 1 and record["optimizer"]["clip_grad"] == 0.5


def parse_with_json(tmp_path, content, *flags):
    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.config import from_args

    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    parsed = build_parser().parse_args(
        [
            "--data-path",
            "x",
            "--train-iters",
            "1",
            "--deepspeed",
            "--deepspeed_config",
            str(path),
            *flags,
        ]
    )
    return from_args(parsed, world_size=2)


def test_a_setting_the_json_overrides_is_warned_about(tmp_path, caplog):
    job = parse_with_json(tmp_path, {"zero_optimization": {"stage": 1}}, "--zero-stage", "0")
    assert job.parallel.zero_stage == 1
    assert any(
        "sets 1 over --zero-stage 0" in r.getMessage() and r.levelname == "WARNING"
        for r in caplog.records
    )


def test_a_deepspeed_optimizer_block_is_honoured(tmp_path):
    job = parse_with_json(
        tmp_path,
        {
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1},
            }
        },
        "--lr",
        "1e-3",
    )
    opt = job.optimizer
    assert (opt.lr, opt.betas, opt.adam_eps, opt.weight_decay) == (3e-4, (0.9, 0.95), 1e-6, 0.1)
    assert "optimizer" not in job.deepspeed_overrides  # the engine gets our AdamW with these values


@pytest.mark.parametrize(
    "content, flags, message",
    [
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {}}},
            (),
            "the scheduler block (WarmupDecayLR) is not used",
        ),
        (
            {"optimizer": {"type": "Lamb", "params": {}}},
            (),
            "optimizer 'Lamb' is not what glm-pretrain trains with",
        ),
        (
            {"optimizer": {"type": "Adam", "params": {"amsgrad": True}}},
            (),
            "params ['amsgrad'] have no AdamW",
        ),
        (
            {"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}},
            (),
            "adam_w_mode/bias_correction false",
        ),
        # flags of 8 x 2 (x DP 2) against a JSON of 4 x 4: the engine would step every second iteration
        (
            {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4},
            ("--micro-batch-size", "8", "--global-batch-size", "32"),
            "train_micro_batch_size_per_gpu 4, the flags give 8",
        ),
        (
            {"gradient_accumulation_steps": 4},
            ("--micro-batch-size", "8", "--global-batch-size", "32"),
            "gradient_accumulation_steps 4, the flags give 2",
        ),
        (
            {"train_batch_size": 64},
            ("--global-batch-size", "32"),
            "train_batch_size 64, the flags give 32",
        ),
        (
            {"zero_optimization": {"stage": 2}},
            ("--pipeline-model-parallel-size", "2"),
            "--zero-stage 2 cannot be combined with pipeline parallelism",
        ),
        (
            {"gradient_cliping": 0.01, "zero_optimisation": {"stage": 2}},
            (),
            "'gradient_cliping' is not a DeepSpeed key (DeepSpeed would ignore it): did you mean 'gradient_clipping'?",
        ),
        (
            {"gradient_cliping": 0.01, "zero_optimisation": {"stage": 2}},
            (),
            "did you mean 'zero_optimization'?",
        ),
        (
            {"zero_optimization": {"stge": 2}},
            (),
            "zero_optimization is not DeepSpeed's: stge: Extra inputs",
        ),
        ({"gradient_clipping": -1}, (), "gradient_clipping -1: give a norm >= 0"),
        (
            {"bf16": {"enabled": True}, "fp16": {"enabled": True}},
            (),
            "enables both bf16 and fp16: enable one",
        ),
        ("{not json", (), "not a JSON file"),
        ("[1, 2]", (), "a DeepSpeed config is a JSON object"),
    ],
)
def test_a_deepspeed_json_that_cannot_be_honoured_is_refused(tmp_path, content, flags, message):
    with pytest.raises(ValueError) as e:
        parse_with_json(tmp_path, content, *flags)
    assert message in str(e.value)


@pytest.mark.slow
def test_tensor_parallel_pretraining_matches_one_process(tmp_path, data):
    """glm-pretrain under torchrun with TP=2, sequence parallelism and recomputation == one process."""
    from megatron_glm.checkpoint import load_model_weights
    from tests.helpers import free_port

    no_dropout = ["--hidden-dropout", "0", "--attention-dropout", "0"]
    one = str(tmp_path / "tp1" / "ckpt")
    assert run(args(data, one, iters=4, extra=no_dropout)).returncode == 0
    two = str(tmp_path / "tp2" / "ckpt")
    extra = no_dropout + [
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
        "--recompute-granularity",
        "full",
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    result = subprocess.run(
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
            *args(data, two, 4, extra),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = records(one), records(two)
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["lm_loss"] == pytest.approx(x["lm_loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
    assert sorted(
        n for n in os.listdir(os.path.join(two, "iter_0000004")) if n.startswith("mp_rank")
    ) == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    merged, meta = load_model_weights(two)
    single, _ = load_model_weights(one)
    assert meta["tensor_model_parallel_size"] == 2 and merged.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(merged[name], single[name], atol=2e-4, rtol=1e-3, msg=name)
    # the TP=2 checkpoint continues on one process, resharded as it loads
    more = [*no_dropout, "--use-checkpoint-opt_param-scheduler"]
    result = run(args(data, two, iters=6, extra=more))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resharded of a TP 2 x PP 1 x DP 1 ZeRO-0 run: TP 2 -> 1" in result.stdout
    assert [r["iteration"] for r in records(two)][-2:] == [5, 6]


def test_the_banner_and_meta_report_what_a_deepspeed_json_made_of_the_flags(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 0.5, "zero_optimization": {"stage": 1}}))
    save = str(tmp_path / "ckpt")
    result = run(args(data, save, iters=2, extra=["--deepspeed", "--deepspeed_config", str(path)]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ZeRO 1, clip 0.5, fp32" in result.stdout  # read back from the engine
    with open(os.path.join(save, "iter_0000002", "meta.json")) as f:
        settings = json.load(f)["settings"]
    assert settings["parallel"]["zero_stage"] == 1 and settings["optimizer"]["clip_grad"] == 0.5


@pytest.mark.slow
def test_megatrons_exit_flags_save_and_stop_cleanly_and_the_same_command_continues(tmp_path, data):
    save, board = str(tmp_path / "ckpt"), tmp_path / "board"
    extra = [
        "--exit-interval",
        "2",
        "--norm-epsilon",
        "1e-6",
        "--make-vocab-size-divisible-by",
        "256",
        "--tensorboard-dir",
        str(board),
        "--eval-interval",
        "100",
    ]
    first = run(args(data, save, iters=6, extra=extra))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopping after iteration 2 (--exit-interval): saved" in first.stdout
    with open(os.path.join(save, "iter_0000002", "meta.json")) as f:
        model = json.load(f)["model"]
    assert model["layernorm_epsilon"] == 1e-6 and model["vocab_size"] % 256 == 0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(board))
    # the same command again, with a time budget already spent at the first step: one step, saved, status 0
    second = run(args(data, save, iters=6, extra=extra + ["--exit-duration-in-mins", "1e-9"]))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    assert "stopping after iteration 3 (--exit-duration-in-mins reached): saved" in second.stdout
    assert [r["iteration"] for r in records(save)] == [1, 2, 3]


def sample_based(data, save, extra=()):
    """args() measured in samples: 30 samples, the batch ramping 2, 2, 4, 6, then 8 (Megatron's flags)."""
    argv = args(
        data,
        save,
        extra=[
            "--global-batch-size",
            "8",
            "--train-samples",
            "30",
            "--rampup-batch-size",
            "2",
            "2",
            "12",
            "--lr-warmup-samples",
            "8",
            "--lr-decay-samples",
            "40",
            *extra,
        ],
    )
    for flag in ("--train-iters", "--lr-warmup-iters"):
        i = argv.index(flag)
        del argv[i : i + 2]
    return argv


@pytest.mark.slow
def test_train_samples_with_a_batch_ramp_up_resumes_mid_ramp_as_if_uninterrupted(tmp_path, data):
    clean = str(tmp_path / "clean" / "ckpt")
    done = run(sample_based(data, clean))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ramped up from 2 by 2 over 12 samples" in done.stdout
    reference = records(clean)
    # Megatron's count: 4 ramp-up steps to 14 samples, then (30 - 14) // 8 whole batches
    assert [r["batch_size"] for r in reference] == [2, 2, 4, 6, 8, 8]
    assert [r["consumed_samples"] for r in reference] == [2, 4, 8, 14, 22, 30]
    # logged after the step, as Megatron logs it: the warm-up's rate at 4 of its 8 samples, then the decay's
    assert reference[0]["lr"] == pytest.approx(1e-3 * 4 / 8) and reference[2][
        "lr"
    ] == pytest.approx(1e-3)
    assert 0 < reference[4]["lr"] < reference[3]["lr"] < 1e-3

    save = str(tmp_path / "stopped" / "ckpt")
    # stops mid-ramp, at 8 samples
    first = run(sample_based(data, save, extra=["--exit-interval", "3"]))
    assert first.returncode == 0 and "stopping after iteration 3" in first.stdout, first.stderr[
        -3000:
    ]
    second = run(sample_based(data, save))
    assert second.returncode == 0, second.stderr[-3000:]
    for r, ref in zip(records(save), reference, strict=True):
        assert (r["iteration"], r["batch_size"], r["lr"]) == (
            ref["iteration"],
            ref["batch_size"],
            ref["lr"],
        )
        assert r["lm_loss"] == ref["lm_loss"] and r["grad_norm"] == ref["grad_norm"], r["iteration"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data):
    """4 steps with ZeRO-1 (its master weights live in the optimizer partitions), and the same weights through
    glm-convert: a weights-only checkpoint, which resumes with a fresh optimizer and --seed's random state."""
    from megatron_glm.convert.cli import main as convert

    root = tmp_path_factory.mktemp("pretrained")
    save = str(root / "ckpt")
    done = run(args(data, save, iters=4, extra=["--zero-stage", "1"]))
    assert done.returncode == 0, done.stderr[-3000:]
    converted = str(root / "converted")
    assert convert(["reshard", "--load", save, "--save", converted]) == 0
    return save, converted


@pytest.mark.slow
def test_no_load_optim_and_rng_take_what_a_converted_checkpoint_gives(tmp_path, data, pretrained):
    save, converted = pretrained
    fresh = str(tmp_path / "fresh" / "ckpt")
    a = run(
        args(
            data,
            fresh,
            iters=6,
            extra=["--zero-stage", "1", "--load", save, "--no-load-optim", "--no-load-rng"],
        )
    )
    assert a.returncode == 0, a.stderr[-3000:]
    assert "the optimizer state and lr schedule start fresh; random state from --seed" in a.stdout
    via_convert = str(tmp_path / "via-convert" / "ckpt")
    b = run(args(data, via_convert, iters=6, extra=["--zero-stage", "1", "--load", converted]))
    assert b.returncode == 0, b.stderr[-3000:]
    ours, theirs = records(fresh), records(via_convert)
    assert [r["iteration"] for r in ours] == [5, 6] and ours[0]["consumed_samples"] == 20
    # DeepSpeed's module-only load = our converter's weights
    for r, ref in zip(ours, theirs, strict=True):
        assert (r["lm_loss"], r["grad_norm"], r["lr"]) == (
            ref["lm_loss"],
            ref["grad_norm"],
            ref["lr"],
        )


@pytest.mark.slow
def test_finetune_starts_at_zero_from_the_weights_and_a_restart_resumes_its_own_checkpoint(
    tmp_path, data, pretrained
):
    save, converted = pretrained
    tuned = str(tmp_path / "tuned" / "ckpt")
    argv = args(data, tuned, iters=2, extra=["--zero-stage", "1", "--load", save, "--finetune"])
    first = run(argv)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "fine-tuning from" in first.stdout
    ours = records(tuned)
    assert [(r["iteration"], r["consumed_samples"]) for r in ours] == [(1, 4), (2, 8)]
    # the oracle: the converted weights with the converter's iteration and data position set back to 0
    zeroed = str(tmp_path / "zeroed")
    shutil.copytree(converted, zeroed)
    meta_path = os.path.join(zeroed, "iter_0000004", "meta.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "iteration": 0, "consumed_samples": 0}, open(meta_path, "w"))
    oracle = str(tmp_path / "oracle" / "ckpt")
    b = run(args(data, oracle, iters=2, extra=["--zero-stage", "1", "--load", zeroed]))
    assert b.returncode == 0, b.stderr[-3000:]
    for r, ref in zip(ours, records(oracle), strict=True):
        assert (r["iteration"], r["lm_loss"], r["grad_norm"], r["lr"]) == (
            ref["iteration"],
            ref["lm_loss"],
            ref["grad_norm"],
            ref["lr"],
        )
    # the same command again (a requeued job) finds its own checkpoint in --save and resumes that
    from megatron_glm.checkpoint import find_resume
    from megatron_glm.config import ModelConfig

    cfg = ModelConfig.from_dict(meta["model"])
    again = find_resume(save, tuned, cfg, None, finetune=True)
    assert (again.load_dir, again.tag, again.finetune) == (tuned, "iter_0000002", False)
    first_time = find_resume(save, str(tmp_path / "new"), cfg, None, finetune=True)
    assert (first_time.load_dir, first_time.finetune) == (save, True)


def test_the_fused_adamw_steps_as_the_default_one():
    """--optimizer-impl fused-adamw is torch's fused kernel, and it takes the step the foreach AdamW takes."""
    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel
    from megatron_glm.training.engine import make_optimizer, param_groups

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=128)
    models = [GLMModel(cfg, seed=3) for _ in range(2)]
    opts = [
        make_optimizer(impl, param_groups(m, 0.1), 1e-2, (0.9, 0.95), 1e-8)
        for impl, m in zip(("adamw", "fused-adamw"), models)
    ]
    assert opts[1].defaults["fused"] and not opts[0].defaults["fused"]
    for _ in range(3):
        for m, o in zip(models, opts):
            for p in m.parameters():
                p.grad = torch.ones_like(p) * torch.arange(p.numel()).view_as(p).float().cos()
            o.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
