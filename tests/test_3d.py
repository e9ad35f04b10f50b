"""glm-pretrain under pipeline, tensor and data parallelism with ZeRO: every layout equals one process.

Real processes under torchrun (gloo). The model is tiny (4 layers) and dropout is off, so
the runs differ from the single-process one only by floating-point summation order.
"""

import os

import pytest

from megatron_glm.data_prep.preprocess import preprocess
from tests.helpers import deepspeed_consolidation, launch_pretrain, records, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus, tokenizer, spm_model):
    """The dataset, and small --eval-tasks files: every layout also scores them at each validation."""
    root = tmp_path_factory.mktemp("three_d")
    preprocess([corpus[0]], str(root / "docs"), tokenizer.spec, append_eod=True)
    short = [t for t in corpus[1][-60:] if 4 <= len(t.split()) <= 12][:5]
    write_jsonl(str(root / "blank.jsonl"), [{"text": t} for t in short])
    write_jsonl(str(root / "lambada.jsonl"), [{"text": t} for t in short])
    write_jsonl(
        str(root / "choice.jsonl"),
        [
            {"text": "Return the [MASK] of the object.", "choices": c, "label": 0}
            for c in (["size", "file"], ["name", "value", "end"])
        ],
    )
    tasks = [f"{kind}:{root / kind}.jsonl" for kind in ("blank", "choice", "lambada")]
    return str(root / "docs_text_document"), spm_model, str(root / "cache"), tasks


def argv(data, log_dir, iters=3, extra=()):
    prefix, model, cache, tasks = data
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
        "32",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--train-iters",
        str(iters),
        "--lr",
        "1e-3",
        "--split",
        "90,10,0",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--log-interval",
        "1",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--data-cache-path",
        cache,
        "--log-dir",
        log_dir,
        "--eval-tasks",
        *tasks,
        *extra,
    ]


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    out = str(tmp_path_factory.mktemp("single"))
    result = launch_pretrain(1, argv(data, out, extra=["--save", out]))
    assert result.returncode == 0, result.stderr[-8000:]
    return records(out), out


LAYOUTS = {
    "PP2 1F1B": (2, ["--pipeline-model-parallel-size", "2"]),
    "PP2 interleaved": (
        2,
        ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    ),
    "TP2xPP2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "DP2xTP2 ZeRO-1": (4, ["--tensor-model-parallel-size", "2", "--zero-stage", "1"]),
    "DP2xPP2 ZeRO-1": (4, ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"]),
    "DP2xTP2xPP2 ZeRO-1 + SP": (
        8,
        [
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--zero-stage",
            "1",
            "--sequence-parallel",
        ],
    ),
    "DP2 ZeRO-0": (2, ["--zero-stage", "0"]),
    "DP2 ZeRO-2": (2, ["--zero-stage", "2"]),
    "DP2 ZeRO-3": (2, ["--zero-stage", "3"]),
    "DP2 ZeRO-2 + CPU offload": (2, ["--zero-stage", "2", "--cpu-offload"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.slow
def test_layout_equals_one_process(tmp_path, data, single, name):
    import torch

    from megatron_glm.checkpoint import CheckpointError, load_model_weights

    single, single_dir = single
    nproc, extra = LAYOUTS[name]
    result = launch_pretrain(
        nproc, argv(data, str(tmp_path), extra=extra + ["--save", str(tmp_path)])
    )
    assert result.returncode == 0, result.stderr[-8000:]
    ours = records(str(tmp_path))
    assert [r["iteration"] for r in ours] == [r["iteration"] for r in single]
    for a, b in zip(ours, single):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=2e-5), name
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-4), name
        assert ("valid_loss" in a) == ("valid_loss" in b)
        if "valid_loss" in b:
            assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=2e-5), name
        tasks = {
            k: v for k, v in b.items() if k.startswith("eval/")
        }  # --eval-tasks scored on this layout
        assert tasks.keys() == {k for k in a if k.startswith("eval/")} and bool(tasks) == (
            "valid_loss" in b
        )
        for key, value in tasks.items():
            assert a[key] == pytest.approx(value, rel=2e-5), (name, key)
    reference, _ = load_model_weights(single_dir)
    if "ZeRO-3" in name:
        with pytest.raises(CheckpointError, match="ZeRO-3 partitions"):
            load_model_weights(str(tmp_path))
        return
    # shards of every TP x PP rank (and chunk) put back together
    merged, _ = load_model_weights(str(tmp_path))
    assert merged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], atol=1e-4, rtol=1e-3, msg=key)


@pytest.mark.slow
def test_kill_and_resume_on_a_3d_layout(tmp_path, data):
    """--async-save on DP2 x TP2 x PP2 (ZeRO-1): the save of step 2 is written only after step 3 has changed every
    rank's weights and partitions (async:late), then rank 0 is killed after the rename, before `latest`. The
    killed run's own steps are the uninterrupted trajectory: the resume from step 2 repeats them bit for bit."""
    nproc, extra = (
        8,
        [
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--zero-stage",
            "1",
        ],
    )
    killed = str(tmp_path / "killed")
    resume = ["--save", killed, "--load", killed, "--save-interval", "2", "--async-save"]
    killed_run = launch_pretrain(
        nproc, argv(data, killed, iters=4, extra=extra + resume), fault="async:late,save:renamed"
    )
    assert killed_run.returncode != 0
    names = os.listdir(killed)
    assert "iter_0000002" in names and "latest" not in names, "renamed, `latest` not yet written"
    before = {r["iteration"]: r for r in records(killed)}
    assert {1, 2, 3} <= set(before), "the write of step 2 waited for step 3"
    result = launch_pretrain(nproc, argv(data, killed, iters=4, extra=extra + resume))
    assert result.returncode == 0, result.stderr[-8000:]
    after = [
        r for r in records(killed) if r["iteration"] > 2
    ]  # the resume point: rows past it are redone
    assert [r["iteration"] for r in after] == [3, 4]
    for r in after:
        if r["iteration"] in before:
            assert r["lm_loss"] == before[r["iteration"]]["lm_loss"], r["iteration"]
            assert r["grad_norm"] == before[r["iteration"]]["grad_norm"], r["iteration"]
    files = os.listdir(os.path.join(killed, "iter_0000004"))
    assert sum(f.startswith("mp_rank_") for f in files) == 4, "one model shard per TP x PP rank"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--pipeline-model-parallel-size", "2", "--zero-stage", "2"],
            "cannot be combined with pipeline",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
            "not divisible by",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--pipeline-layers", "3", "2"],
            "--pipeline-layers",
        ),
        (["--pipeline-model-parallel-size", "3"], "not a multiple of"),
    ],
)
@pytest.mark.slow
def test_impossible_layouts_fail_before_work(tmp_path, data, extra, message):
    result = launch_pretrain(2, argv(data, str(tmp_path / "log"), extra=extra))
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "log")


@pytest.mark.slow
def test_bf16_pipeline_tracks_bf16_one_process(tmp_path, data):
    """bf16 runs without a loss scaler; PP=2 follows the one-process bf16 run (same optimizer path)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert launch_pretrain(1, argv(data, one, extra=["--bf16"])).returncode == 0
    result = launch_pretrain(
        2, argv(data, two, extra=["--bf16", "--pipeline-model-parallel-size", "2"])
    )
    assert result.returncode == 0, result.stderr[-8000:]
    for a, b in zip(records(two), records(one)):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-3)
        assert a["skipped_steps"] == 0 and "loss_scale" not in a


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(),
    reason="DeepSpeed's CPU accelerator has no fp16 optimizer: this needs a GPU",
)
def test_fp16_survives_an_injected_overflow(tmp_path, data):
    out = str(tmp_path / "fp16")
    result = launch_pretrain(1, argv(data, out, iters=4, extra=["--fp16"]), fault="overflow:2")
    assert result.returncode == 0, result.stderr[-8000:]
    seen = records(out)
    assert seen[0]["skipped_steps"] == 0 and seen[1]["skipped_steps"] == 1, (
        "the overflowing step is skipped"
    )
    assert seen[2]["loss_scale"] < seen[0]["loss_scale"], "and the scale drops"
    assert all(r["lm_loss"] < 100 for r in (seen[2], seen[3])), "training goes on"


@pytest.mark.slow
def test_resume_with_another_data_parallel_size(tmp_path, data):
    """Saved on one process, resumed on two (ZeRO-0): the same samples, the same losses."""
    clean = str(tmp_path / "clean")
    assert launch_pretrain(1, argv(data, clean, iters=4)).returncode == 0
    moved = str(tmp_path / "moved")
    ckpt = ["--save", moved, "--load", moved, "--save-interval", "2"]
    assert (
        launch_pretrain(1, argv(data, moved, iters=4, extra=ckpt), fault="iteration:3").returncode
        != 0
    )
    result = launch_pretrain(2, argv(data, moved, iters=4, extra=ckpt))
    assert result.returncode == 0, result.stderr[-8000:]
    assert "resumed from" in result.stdout and "x 2 data-parallel ranks" in result.stdout
    reference = {r["iteration"]: r for r in records(clean)}
    for r in records(moved):
        assert r["lm_loss"] == pytest.approx(reference[r["iteration"]]["lm_loss"], rel=2e-5), r[
            "iteration"
        ]
        assert r["consumed_samples"] == 8 * r["iteration"]


@pytest.mark.slow
def test_kill_and_resume_with_dropout_under_tensor_parallelism(tmp_path, data):
    """Dropout on split heads draws from the TP tracker's RNG: it is checkpointed too (bitwise resume)."""
    extra = [
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
        "--hidden-dropout",
        "0.1",
        "--attention-dropout",
        "0.1",
    ]
    clean = str(tmp_path / "clean")
    assert launch_pretrain(2, argv(data, clean, iters=4, extra=extra)).returncode == 0
    killed = str(tmp_path / "killed")
    resume = ["--save", killed, "--load", killed, "--save-interval", "2"]
    assert (
        launch_pretrain(
            2, argv(data, killed, iters=4, extra=extra + resume), fault="iteration:3"
        ).returncode
        != 0
    )
    assert launch_pretrain(2, argv(data, killed, iters=4, extra=extra + resume)).returncode == 0
    reference = {r["iteration"]: r["lm_loss"] for r in records(clean)}
    for r in records(killed):
        assert r["lm_loss"] == reference[r["iteration"]], r["iteration"]


@pytest.mark.slow
def test_embedding_gradient_shrink_under_tp_and_pp(tmp_path, data, single):
    """--embedding-gradient-shrink-alpha on TP2xPP2 (vocab-parallel lookup, tied copy on the last stage) equals
    one process with the same flag, and changes training (so the flag reaches the model)."""
    shrink = ["--embedding-gradient-shrink-alpha", "0.1"]
    runs = {}
    for nproc, extra in (
        (1, []),
        (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    ):
        out = tmp_path / str(nproc)
        result = launch_pretrain(nproc, argv(data, str(out), extra=shrink + extra))
        assert result.returncode == 0, result.stderr[-8000:]
        runs[nproc] = records(str(out))
    for a, b in zip(runs[4], runs[1]):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=2e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-4)
    plain, _ = single
    assert runs[1][0]["lm_loss"] == plain[0]["lm_loss"], (
        "the forward of the first step is unchanged"
    )
    assert runs[1][0]["grad_norm"] != pytest.approx(plain[0]["grad_norm"], rel=1e-4), (
        "the gradient shrinks"
    )


# -- uneven pipeline stages (Megatron's flags) -----------------------------------------------------------------
PP3 = ["--pipeline-model-parallel-size", "3"]
UNEVEN = {  # name: (processes, flags, each rank's chunks as [start, stop) layer ranges)
    "first/last": (
        3,
        PP3
        + ["--decoder-first-pipeline-num-layers", "2", "--decoder-last-pipeline-num-layers", "2"],
        [[[0, 2]], [[2, 5]], [[5, 7]]],
    ),
    "embedding and loss as layers": (
        3,
        PP3 + ["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"],
        [[[0, 2]], [[2, 5]], [[5, 7]]],
    ),
    "interleaved, embedding as a layer": (  # 7 + 1 units over 2 x 2 chunks: 1 + 2 | 2 + 2
        2,
        ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"]
        + ["--account-for-embedding-in-pipeline-split"],
        [[[0, 1], [3, 5]], [[1, 3], [5, 7]]],
    ),
}


@pytest.mark.slow
def test_uneven_pipeline_stages_equal_one_process_convert_and_resume(tmp_path, data):
    """GLM-130B's kind of split at small size: 7 layers as 2 + 3 + 2 on PP 3, by Megatron's first/last flags and
    by counting the embedding and the loss as layers, and interleaved on PP 2 with the embedding as a layer.
    Losses and gradient norms equal one process's (fp32); the checkpoint converts to PP 1 and back bitwise, and
    resumes as if uninterrupted."""
    import json

    from megatron_glm.checkpoint import load_model_weights

    seven = ["--num-layers", "7", "--save-interval", "2"]
    one = str(tmp_path / "one")
    assert (
        launch_pretrain(1, argv(data, one, iters=4, extra=seven + ["--save", one])).returncode == 0
    )
    reference = records(one)
    for name, (nproc, flags, ranges) in UNEVEN.items():
        out = str(tmp_path / name.replace(" ", "_").replace("/", "_").replace(",", ""))
        result = launch_pretrain(
            nproc, argv(data, out, iters=4, extra=seven + flags + ["--save", out])
        )
        assert result.returncode == 0, result.stderr[-8000:]
        with open(os.path.join(out, "iter_0000004", "meta.json")) as f:
            assert json.load(f)["pipeline_layers"] == ranges, name
        ours = records(out)
        assert [r["iteration"] for r in ours] == [1, 2, 3, 4]
        for a, b in zip(ours, reference):
            assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), name
    nproc, flags, ranges = UNEVEN["embedding and loss as layers"]
    out = str(tmp_path / "embedding_and_loss_as_layers")
    whole, back = str(tmp_path / "pp1"), str(tmp_path / "back")
    assert convert_main(["reshard", "--load", out, "--save", whole]) == 0
    target = ["--target-pp", "3"] + [f.replace("--", "--target-", 1) for f in flags[2:]]
    assert convert_main(["reshard", "--load", whole, "--save", back, *target]) == 0
    original, _ = load_model_weights(out)
    for converted in (whole, back):
        state, meta = load_model_weights(converted)
        assert state.keys() == original.keys() and all(
            torch_equal(state[k], original[k]) for k in state
        )
    assert meta["pipeline_layers"] == ranges
    resumed = str(tmp_path / "resumed")
    extra = seven + flags + ["--save", resumed]
    extra += ["--load", os.path.join(out, "iter_0000002")]
    result = launch_pretrain(nproc, argv(data, resumed, iters=4, extra=extra))
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stderr[-8000:]
    exact = ("iteration", "lm_loss", "grad_norm", "valid_loss", "lr", "consumed_samples")

    def values(rows):
        return [{k: r.get(k) for k in exact} for r in rows]

    assert values(records(resumed)) == values(r for r in records(out) if r["iteration"] > 2)


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


# -- changing layout with the whole training state: straight from the checkpoint, or a universal one -----------

TP2PP2_ZERO1 = [
    "--tensor-model-parallel-size",
    "2",
    "--pipeline-model-parallel-size",
    "2",
    "--zero-stage",
    "1",
]


def uninterrupted(tmp_path_factory, data, name, nproc, extra):
    """8 steps saved after 4: the reference for steps 5-8 of a run resumed from step 4 on another layout,
    and the checkpoint of step 4 (its iter_0000004 folder)."""
    out = str(tmp_path_factory.mktemp(name))
    result = launch_pretrain(
        nproc, argv(data, out, iters=8, extra=extra + ["--save", out, "--save-interval", "4"])
    )
    assert result.returncode == 0, result.stderr[-8000:]
    return {r["iteration"]: r for r in records(out)}, os.path.join(out, "iter_0000004")


def to_universal(step4: str) -> str:
    universal = os.path.dirname(step4) + "-universal"
    assert convert_main(["to-universal", "--load", step4, "--save", universal]) == 0
    return universal


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory, data):
    return uninterrupted(tmp_path_factory, data, "tp2pp2", 4, TP2PP2_ZERO1)


def convert_main(argv_):
    from megatron_glm.convert.cli import main

    return main(argv_)


def assert_continues(result, out, reference):
    assert result.returncode == 0, result.stderr[-8000:]
    assert "resumed from" in result.stdout and "at iteration 4" in result.stdout
    assert_steps_5_to_8(out, reference)


def assert_steps_5_to_8(out, reference):
    """The resumed run's steps 5-8 (``out``'s metrics) are the uninterrupted run's."""
    seen = records(out)
    assert [r["iteration"] for r in seen] == [5, 6, 7, 8]
    for r in seen:
        ref = reference[r["iteration"]]
        assert r["lm_loss"] == pytest.approx(ref["lm_loss"], rel=1e-5), r["iteration"]
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), r["iteration"]
        assert (
            r["lr"] == pytest.approx(ref["lr"], rel=1e-6)
            and r["consumed_samples"] == ref["consumed_samples"]
        )


# TP1xPP1xDP2 is the moments test's move (test_the_moments_right_after_...)
NEW_LAYOUTS = {
    "TP2xPP1xDP2 ZeRO-2": (4, ["--tensor-model-parallel-size", "2", "--zero-stage", "2"]),
    "TP1xPP2xDP2": (4, ["--pipeline-model-parallel-size", "2", "--zero-stage", "1"]),
}


@pytest.mark.parametrize("name", list(NEW_LAYOUTS))
@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_layout_as_if_uninterrupted(tmp_path, data, tp2pp2, name):
    """4 steps on TP2xPP2 (ZeRO-1), 4 more on another TP x PP x DP (and ZeRO stage) straight from that
    checkpoint: steps 5-8 are the uninterrupted run's, which they could not be with a fresh optimizer or
    schedule."""
    reference, original = tp2pp2
    nproc, extra = NEW_LAYOUTS[name]
    out = str(tmp_path / "moved")
    result = launch_pretrain(
        nproc, argv(data, out, iters=8, extra=extra + ["--load", original, "--save", out])
    )
    assert_continues(result, out, reference)
    assert "resharded of a TP 2 x PP 2 x DP 1 ZeRO-1 run" in result.stdout


@pytest.mark.slow
def test_zero3_to_zero1_straight_from_the_checkpoint(tmp_path_factory, tmp_path, data):
    reference, original = uninterrupted(tmp_path_factory, data, "zero3", 2, ["--zero-stage", "3"])
    out = str(tmp_path / "zero1")
    extra = ["--zero-stage", "1", "--load", original, "--save", out]
    result = launch_pretrain(2, argv(data, out, iters=8, extra=extra))
    assert_continues(result, out, reference)


@pytest.mark.slow
def test_zero0_through_a_universal_checkpoint_to_two_replicas(tmp_path_factory, tmp_path, data):
    """Without ZeRO the moments sit in each rank's model file (the optimizer's parameter order), and go back into
    the optimizer keyed by parameter: one process's run, converted, continues on DP2 as if uninterrupted."""
    reference, original = uninterrupted(tmp_path_factory, data, "zero0", 1, ["--zero-stage", "0"])
    out = str(tmp_path / "dp2")
    extra = ["--zero-stage", "0", "--load", to_universal(original), "--save", out]
    assert_continues(launch_pretrain(2, argv(data, out, iters=8, extra=extra)), out, reference)


def _state_after_resume(rank, world, argv_):
    """Each parameter's fp32 master and Adam moments in the engine a resume on TP 1 built, beside DeepSpeed's
    own consolidation of the checkpoint's partitions (``zero_to_fp32``, merged over TP x PP)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megatron_glm.checkpoint import universal
    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.config import from_args
    from megatron_glm.training.trainer import Trainer

    trainer = Trainer(from_args(build_parser().parse_args(argv_), world_size=world))
    resume = trainer.resume
    files = deepspeed_consolidation(resume.load_dir, resume.tag, resume.meta)
    worst, steps = {}, set()
    for _, p, full in universal.local_parameters(trainer.chunks):
        for state in universal.STATES:
            got = (
                safe_get_full_fp32_param(p)
                if state == "fp32"
                else safe_get_full_optimizer_state(p, state)
            )
            worst[state] = max(worst.get(state, 0.0), (got - files[state][full]).abs().max().item())
    for s in trainer.engine.optimizer.optimizer.state.values():
        steps.add(int(s["step"]))
    result = {
        "worst": worst,
        "steps": steps,
        "iteration": trainer.iteration,
        "lr": trainer.engine.get_lr()[0],
        "changes": resume.changes,
    }
    trainer.train()
    trainer.close()
    return result


@pytest.mark.slow
def test_the_moments_right_after_a_resume_on_another_layout_are_the_merged_originals(
    tmp_path, data, tp2pp2
):
    """On TP1 x DP2 ZeRO-1 the engine's fp32 masters and moments equal the TP2xPP2 checkpoint's, as DeepSpeed's
    own consolidation merges them; steps 5-8 then equal the uninterrupted run's."""
    from tests.helpers import spawn

    reference, original = tp2pp2
    out = str(tmp_path / "probe")
    results = spawn(
        _state_after_resume,
        2,
        tmp_path / "ranks",
        argv(data, out, iters=8, extra=["--zero-stage", "1", "--load", original]),
    )
    for r in results:
        assert r["changes"][:2] == ["TP 2 -> 1", "PP 2 -> 1"] and "DP 1 -> 2" in r["changes"]
        assert r["iteration"] == 4 and r["steps"] == {4}
        assert all(diff == 0.0 for diff in r["worst"].values()), r["worst"]
        assert r["lr"] == pytest.approx(reference[4]["lr"], rel=1e-6)
    assert_steps_5_to_8(out, reference)


@pytest.fixture(scope="module")
def tp2pp2_universal(tp2pp2):
    return to_universal(tp2pp2[1])


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "a universal parameter file missing",
            "is missing: the universal checkpoint is incomplete",
        ),
        ("an optimizer partition missing", "the checkpoint is incomplete"),
        ("layers that do not split", "is not divisible by pipeline stages 3"),
        ("another architecture", "another architecture"),
    ],
)
def test_resumes_on_another_layout_refuse_what_cannot_work(
    tmp_path, data, tp2pp2, tp2pp2_universal, case, message
):
    import shutil

    load, nproc, extra = tp2pp2[1], 1, []
    if case == "a universal parameter file missing":
        load = str(tmp_path / "incomplete")
        shutil.copytree(tp2pp2_universal, load)
        zero = os.path.join(load, "iter_0000004", "zero")
        os.remove(
            os.path.join(zero, "transformer.layers.2.mlp.dense_4h_to_h.weight", "exp_avg_sq.pt")
        )
    elif case == "an optimizer partition missing":
        load = str(tmp_path / "incomplete" / "iter_0000004")
        shutil.copytree(tp2pp2[1], load)
        os.remove(os.path.join(load, "zero_pp_rank_0_mp_rank_03_optim_states.pt"))
    elif case == "layers that do not split":
        nproc, extra = 3, ["--pipeline-model-parallel-size", "3"]
    elif case == "another architecture":
        extra = ["--hidden-size", "64"]
    out = str(tmp_path / "out")
    result = launch_pretrain(
        nproc,
        argv(data, str(tmp_path / "log"), iters=8, extra=extra + ["--load", load, "--save", out]),
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    # (torchrun prints its own when a rank fails)
    assert nproc > 1 or "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(out, "latest")), "nothing saved"


def _embedding_after_resume(rank, world, argv_):
    """The word embedding's fp32 master and Adam moments right after a resume on another layout, the resume's
    warnings, and the iterations the run then trains."""
    import logging

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.config import from_args
    from megatron_glm.training.trainer import Trainer

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("megatron_glm").addHandler(handler)
    trainer = Trainer(from_args(build_parser().parse_args(argv_), world_size=world))
    p = trainer.chunks[0].word_embeddings.weight
    got = {
        "fp32": safe_get_full_fp32_param(p).clone(),
        **{m: safe_get_full_optimizer_state(p, m).clone() for m in ("exp_avg", "exp_avg_sq")},
    }
    trainer.train()
    trainer.close()
    return {**got, "warnings": warnings}


@pytest.mark.slow
def test_tp2_to_tp1_changes_the_vocabulary_padding_with_no_flag(tmp_path_factory, tmp_path, data):
    """--make-vocab-size-divisible-by 140 pads the tokenizer's 1,500 ids to 1,680 rows on TP 2 and to 1,540 on
    TP 1. The TP 2 run's checkpoint resumes on TP 1 as it is: the padding rows past 1,540 are dropped (a
    warning says so), and the tokenizer's rows of the weights and Adam moments are bitwise the checkpoint's,
    as DeepSpeed's own consolidation reads them."""
    import torch

    from megatron_glm import checkpoint as ckpt
    from tests.helpers import spawn

    pad = ["--make-vocab-size-divisible-by", "140"]
    tp2 = ["--tensor-model-parallel-size", "2", *pad]
    _, original = uninterrupted(tmp_path_factory, data, "tp2pad", 2, tp2)
    tp1 = ["--zero-stage", "1", *pad, "--load", original]
    out = str(tmp_path / "tp1")
    got = spawn(_embedding_after_resume, 2, tmp_path / "ranks", argv(data, out, iters=8, extra=tp1))
    tokenizer_rows = 1500
    folder, tag = os.path.split(original)
    files = deepspeed_consolidation(folder, tag, ckpt.read_meta(folder, tag))
    for state in ("fp32", "exp_avg", "exp_avg_sq"):
        saved = files[state]["word_embeddings.weight"]
        assert saved.shape[0] == 1680 and all(g[state].shape[0] == 1540 for g in got)
        for g in got:
            assert torch.equal(g[state][:tokenizer_rows], saved[:tokenizer_rows]), state
    assert any("its 140 last padding rows are dropped" in w for w in got[0]["warnings"])
    assert [r["iteration"] for r in records(out)] == [5, 6, 7, 8]


@pytest.mark.slow
def test_to_universal_streams_in_parallel_and_equals_deepspeeds_consolidation(tmp_path, tp2pp2):
    """glm-convert to-universal --workers 2, one parameter at a time: every file is DeepSpeed's own
    consolidation of that state, bitwise, and meta.json carries the step, schedule and counters."""
    import json

    import torch

    from megatron_glm import checkpoint as ckpt
    from megatron_glm.checkpoint.universal import read_state

    _, original = tp2pp2
    out = str(tmp_path / "universal")
    assert convert_main(["to-universal", "--load", original, "--save", out, "--workers", "2"]) == 0
    folder, tag = os.path.split(original)
    files = deepspeed_consolidation(folder, tag, ckpt.read_meta(folder, tag))
    written = os.path.join(out, tag)
    assert sorted(os.listdir(os.path.join(written, "zero"))) == sorted(files["fp32"])
    for state, tensors in files.items():
        for name, value in tensors.items():
            assert torch.equal(read_state(written, name, state), value), (name, state)
    with open(os.path.join(written, "meta.json")) as f:
        meta = json.load(f)
    assert meta["universal"] and meta["adam_step"] == 4 and meta["global_steps"] == 4
    assert read_state(written, "word_embeddings.weight", "step") == 4


@pytest.mark.slow
def test_the_partition_reader_equals_deepspeeds_consolidation(tmp_path, data):
    """The streaming reader's fp32 masters and moments of DeepSpeed's bf16 optimizer (bf16 ZeRO-1) on an
    interleaved PP 2 x DP 2, against DeepSpeed's own consolidation, bitwise."""
    import torch

    from megatron_glm import checkpoint as ckpt
    from megatron_glm.checkpoint.partitions import SavedTrainingState

    extra = [
        *("--bf16", "--zero-stage", "1", "--pipeline-model-parallel-size", "2"),
        *("--num-layers-per-virtual-pipeline-stage", "1", "--save"),
    ]
    out = str(tmp_path / "run")
    result = launch_pretrain(4, argv(data, out, iters=2, extra=[*extra, out]))
    assert result.returncode == 0, result.stderr[-5000:]
    tag = "iter_0000002"
    meta = ckpt.read_meta(out, tag)
    files = deepspeed_consolidation(out, tag, meta)
    source = SavedTrainingState(os.path.join(out, tag), meta)
    assert source.names() == sorted(files["fp32"])
    for state, tensors in files.items():
        for param, value in tensors.items():
            assert torch.equal(source.whole(param, state), value), (param, state)
    assert source.training_meta()["adam_step"] == 2
