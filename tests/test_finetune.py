"""glm-finetune: cloze classification and seq2seq as blank filling, on the pretraining stack.

What training scores equals what glm-eval scores; the fast layout equals one row per candidate;
every layout equals one process; a fine-tuned model beats the one it started from; a killed run
resumes bitwise; bad input is one line and writes nothing.
"""

import json
import math
import os
import random
import re

import numpy as np
import pytest
import torch

from megatron_glm.data import finetune_data, finetune_metrics
from megatron_glm.model.cloze import ClassificationLoss, classification_loss
from tests.helpers import launch_pretrain, records, tree_md5, write_jsonl

FINETUNE = "megatron_glm.training.finetune"


@pytest.fixture(scope="module")
def model(tokenizer):
    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel

    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        vocab_size=tokenizer.padded_vocab_size(),
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return GLMModel(cfg, seed=3).eval()


def first_sentences(texts, lo=3, hi=14):
    out = []
    for t in texts:
        s = t.strip().split("\n")[0].strip()
        if lo <= len(s.split()) <= hi:
            out.append(s)
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory, corpus, spm_model):
    """A classification task from the stdlib corpus: does a docstring's first sentence start with "Return"?
    Sentence rows, a pattern and one-token verbalizers; and a seq2seq task: two words, reversed."""
    root = tmp_path_factory.mktemp("finetune")
    sentences = first_sentences(corpus[1])
    random.Random(0).shuffle(sentences)
    rows = [{"sentence": s, "label": 0 if s.lower().startswith("return") else 1} for s in sentences]
    splits = {"train": rows[:256], "dev": rows[256:320], "test": rows[320:400]}
    for name, part in splits.items():
        write_jsonl(root / f"cls_{name}.jsonl", part)
    words = sorted({w for s in sentences for w in re.findall(r"\b[a-z]{3,8}\b", s)})[:24]
    rng = random.Random(1)
    for name, n in (("train", 384), ("dev", 32), ("test", 32)):
        pairs = [rng.sample(words, 2) for _ in range(n)]
        write_jsonl(
            root / f"s2s_{name}.jsonl",
            [{"source": f"{a} {b} reversed", "target": f"{b} {a}"} for a, b in pairs],
        )
    majority = max(np.mean([r["label"] == c for r in splits["dev"]]) for c in (0, 1))
    return str(root), spm_model, float(majority)


PATTERN = ["--pattern", "{sentence} Does it return? [MASK].", "--verbalizer", "true", "false"]


def argv(task, out, kind="classification", extra=()):
    root, spm, _ = task
    prefix = "cls" if kind == "classification" else "s2s"
    return [
        "--task",
        kind,
        "--train-data",
        f"{root}/{prefix}_train.jsonl",
        "--valid-data",
        f"{root}/{prefix}_dev.jsonl",
        "--test-data",
        f"{root}/{prefix}_test.jsonl",
        *(PATTERN if kind == "classification" else []),
        "--tokenizer-model",
        spm,
        "--num-layers",
        "4",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "48",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "16",
        "--lr",
        "1e-3",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--log-interval",
        "1",
        "--num-workers",
        "0",
        "--log-dir",
        out,
        *extra,
    ]


def choice_file(path, rows):
    return write_jsonl(path, rows)


# -- training scores what glm-eval scores ---------------------------------------------------
def test_candidate_scores_equal_glm_eval_choice_scores(tmp_path, tokenizer, model):
    from megatron_glm import evaluate
    from megatron_glm.data import eval_tasks

    path = choice_file(
        tmp_path / "mc.jsonl",
        [
            {
                "text": "Return the [MASK] of the file.",
                "choices": ["size", "name of it"],
                "label": 0,
            },
            {
                "text": "Open a [MASK] and read it.",
                "choices": ["socket", "file object", "thread"],
                "label": 1,
            },
        ],
    )
    rows, _ = eval_tasks.build("choice", path, tokenizer, 64, 0)
    nll = evaluate.score(model, [eval_tasks.layout(rows, 64, tokenizer.pad_id)], "cpu")[:, 0]
    split = finetune_data.classification(path, tokenizer, 64)
    assert split.candidates == 3 and not split.single_token
    batch = finetune_data.Layout(split, 64, tokenizer.pad_id, False, fast=False)([0, 1], 2)
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], batch["attn_lo"], batch["attn_hi"])
    scores = ClassificationLoss().score(model, logits, batch)
    assert scores.shape == (2, 3) and torch.isinf(scores[0, 2]) and scores[0, 2] < 0
    ours = scores[torch.isfinite(scores)].double().numpy()
    np.testing.assert_allclose(-ours, nll, rtol=1e-5, atol=1e-5)


def test_the_fast_layout_scores_and_loses_as_one_row_per_candidate(tmp_path, tokenizer, model):
    words = ["file", "name", "value"]  # one token each in the stdlib tokenizer (checked below)
    assert all(len(tokenizer.encode_running(w)) == 1 for w in words)
    path = choice_file(
        tmp_path / "one_token.jsonl",
        [
            {
                "text": f"Return the [MASK] of item {k}.",
                "choices": words[: 2 + k % 2],
                "label": k % 2,
            }
            for k in range(4)
        ],
    )
    split = finetune_data.classification(path, tokenizer, 64)
    assert split.single_token
    results = {}
    for fast in (False, True):
        layout = finetune_data.Layout(split, 64, tokenizer.pad_id, False, fast)
        batch = layout([0, 1, 2], 4)  # a padding example too
        assert batch["tokens"].shape[0] == (4 if fast else 12)
        logits = model(batch["tokens"], batch["position_ids"], batch["attn_lo"], batch["attn_hi"])
        scores = ClassificationLoss().score(model, logits, batch)
        losses = [
            float(ClassificationLoss(kind).loss(model, logits, batch).detach())
            for kind in ("cross_entropy", "hinge", "generative", "mix")
        ]
        results[fast] = scores, losses
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-5)


def test_the_losses_by_hand():
    e = math.e
    scores = torch.tensor(
        [[-1.0, -2.0, -math.inf], [-3.0, -0.5, -1.0], [0.0, 0.0, 0.0]], requires_grad=True
    )
    label = torch.tensor([0, 2, -1])  # the third is a padding example
    ce = (-math.log(e**-1 / (e**-1 + e**-2)) - math.log(e**-1 / (e**-3 + e**-0.5 + e**-1))) / 2
    assert float(classification_loss(scores, label, "cross_entropy").detach()) == pytest.approx(ce)
    # hinge, margin 1: first example max(0, 1 + 1 - 2) = 0; second max(0, 1 + 1 - 3) + max(0, 1 + 1 - 0.5)
    assert float(classification_loss(scores, label, "hinge").detach()) == pytest.approx(1.5 / 2)
    assert float(classification_loss(scores, label, "generative").detach()) == pytest.approx(1.0)
    assert float(classification_loss(scores, label, "mix").detach()) == pytest.approx(ce + 1.0)
    classification_loss(scores, label, "cross_entropy").backward()
    assert torch.isfinite(scores.grad).all() and not scores.grad[2].any()


def test_an_example_stays_whole_in_its_micro_batch_and_epochs_reshuffle(tmp_path, tokenizer):
    path = choice_file(
        tmp_path / "mc.jsonl",
        [
            {
                "text": "Return the [MASK].",
                "choices": ["size", "name", "end of it"][: 2 + k % 2],
                "label": 1,
            }
            for k in range(5)
        ],
    )
    split = finetune_data.classification(path, tokenizer, 64)
    batch = finetune_data.Layout(split, 32, tokenizer.pad_id, False, False)([3, 0], 2)
    assert batch["tokens"].shape[0] == 2 * 3
    assert batch["choice_valid"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["choice_label"].tolist() == [1, 1]
    assert batch["loss_mask"][5].sum() == 0, "the missing candidate's row scores nothing"
    samples = finetune_data.EpochSamples(5, 15, seed=7)
    epochs = [[samples[k] for k in range(e * 5, e * 5 + 5)] for e in range(3)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1
    again = finetune_data.EpochSamples(5, 15, seed=7)
    assert [again[k] for k in range(14, -1, -1)] == [x for e in epochs for x in e][::-1]


def test_metrics_by_hand():
    scores = np.array([[0.0, -1.0], [-2.0, -1.0], [-1.0, -3.0], [-5.0, -4.0]])
    m = finetune_metrics.classification(scores, [0, 1, 1, 0])  # predicted 0, 1, 0, 1
    assert m["accuracy"] == 0.5
    assert m["f1"] == pytest.approx(0.5)  # class 1: tp 1, fp 1, fn 1
    assert m["f1_macro"] == pytest.approx(0.5)
    assert finetune_metrics.token_f1("The cat sat", "cat sat down") == pytest.approx(0.8)
    decoded = finetune_metrics.seq2seq_decoded(["the cat sat", "dog"], ["the cat sat", "a bird"])
    assert decoded["exact_match"] == 0.5 and decoded["rouge1"] == pytest.approx(0.5)


def test_glm_finetune_takes_glm_pretrains_flags_but_the_corpus_and_objective():
    from megatron_glm.data.blank_infilling import BlankInfillingConfig
    from megatron_glm.flags import dest, flagged_fields
    from megatron_glm.training import arguments, finetune
    from megatron_glm.training.dry_run import DryRunConfig

    def dests(parser):
        return {a.dest for a in parser._actions} - {"help"}

    corpus = {"data_path", "split", "data_cache_path"}
    corpus |= {
        dest(f) for cls in (BlankInfillingConfig, DryRunConfig) for f, _, _ in flagged_fields(cls)
    }
    own = {dest(f) for f, _, _ in flagged_fields(finetune.FinetuneConfig)}
    pretrain, tune = dests(arguments.build_parser()), dests(finetune.build_parser())
    assert corpus <= pretrain and not own & pretrain
    assert tune == (pretrain - corpus) | own


# -- bad input: one line, nothing written ---------------------------------------------------
def run_main(argv_, capsys):
    from megatron_glm.training.finetune import main

    code = main(argv_)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "case, message",
    [
        ("malformed", "cls_train.jsonl:3: not a JSON object"),
        ("label", '"label" 7 is not an index into its 2 choices'),
        ("field", "--pattern needs the string field sentence"),
        ("long", "needs 5"),
        ("empty dev", "an empty seq2seq task file"),
        ("flags", "--decode runs glm-generate's search"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, task, capsys, case, message):
    root, _, _ = task
    out = tmp_path / "out"
    kind, extra = "classification", ["--train-iters", "2", "--save", str(out)]
    args = argv(task, str(out), kind, extra)
    bad = tmp_path / "bad.jsonl"
    lines = open(f"{root}/cls_train.jsonl").read().splitlines()
    if case == "malformed":
        write_jsonl(bad, lines[:2] + ['{"sentence": "cut off'] + lines[3:])
        args[args.index("--train-data") + 1] = str(bad)
        message = f"{bad.name}:3: not a JSON object"
    elif case == "label":
        write_jsonl(bad, lines[:4] + [json.dumps({"sentence": "Return it.", "label": 7})])
        args[args.index("--valid-data") + 1] = str(bad)
    elif case == "field":
        write_jsonl(bad, [json.dumps({"text": "Return it.", "label": 0})])
        args[args.index("--test-data") + 1] = str(bad)
    elif case == "long":
        args = argv(task, str(out), "seq2seq", extra)
        args[args.index("--seq-length") + 1] = "4"
        message = "shorten source and target or use a model with longer positions"
    elif case == "empty dev":
        args = argv(task, str(out), "seq2seq", extra)
        write_jsonl(bad, ["", "  "])
        args[args.index("--valid-data") + 1] = str(bad)
    else:
        args = argv(task, str(out), "seq2seq", extra + ["--decode", "greedy"])
        args += ["--tensor-model-parallel-size", "2"]
    code, err = run_main(args, capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("glm-finetune: error: ") and message in err[0], err[0]
    assert not out.exists()


def test_a_checkpoint_of_another_tokenizer_is_refused(tmp_path, task, capsys, corpus):
    from megatron_glm.data_prep.train_tokenizer import train_tokenizer

    out = str(tmp_path / "first")
    first = launch_pretrain(
        1, argv(task, out, extra=["--train-iters", "1", "--save", out]), module=FINETUNE
    )
    assert first.returncode == 0, first.stderr[-4000:]
    before = tree_md5(out)
    other = train_tokenizer([corpus[0]], str(tmp_path / "other"), vocab_size=1450, threads=2)
    args = argv(
        task, str(tmp_path / "second"), extra=["--train-iters", "1", "--load", out, "--finetune"]
    )
    args[args.index("--tokenizer-model") + 1] = other
    code, err = run_main(args, capsys)
    assert code == 1 and len(err) == 1 and "tokenizer" in err[0], err
    assert tree_md5(out) == before and not (tmp_path / "second").exists()


# -- on the real stack ----------------------------------------------------------------------
STEPS = ["--train-iters", "3", "--eval-interval", "2"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, task):
    """One process's records, per task kind."""
    out = {}
    for kind in ("classification", "seq2seq"):
        folder = str(tmp_path_factory.mktemp(f"single-{kind}"))
        result = launch_pretrain(
            1, argv(task, folder, kind, STEPS + ["--save", folder]), module=FINETUNE
        )
        assert result.returncode == 0, result.stderr[-8000:]
        out[kind] = records(folder)
        out[f"{kind} folder"] = folder
    return out


LAYOUTS = {
    "TP2": (2, "classification", ["--tensor-model-parallel-size", "2"]),
    "DP2 ZeRO-1": (2, "classification", ["--zero-stage", "1"]),
    "DP2 ZeRO-3": (2, "classification", ["--zero-stage", "3"]),
    "PP2 uneven 3+1, full recompute": (
        2,
        "classification",
        [
            "--pipeline-model-parallel-size",
            "2",
            "--decoder-first-pipeline-num-layers",
            "3",
            "--recompute-granularity",
            "full",
        ],
    ),
    "TP2 + SP x PP2 interleaved, one row per candidate": (
        4,
        "classification",
        [
            "--tensor-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            "--no-single-token-fast-path",
        ],
    ),
    "bf16": (1, "classification", ["--bf16"]),
    "seq2seq TP2xPP2": (
        4,
        "seq2seq",
        ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_fine_tunes_as_one_process(tmp_path, task, single, name):
    """Losses, gradient norms and the dev scores at each step equal one process's (rel 1e-5); so do the final
    test scores, of the best dev checkpoint read back on the layout."""
    nproc, kind, extra = LAYOUTS[name]
    out = str(tmp_path)
    result = launch_pretrain(
        nproc, argv(task, out, kind, STEPS + extra + ["--save", out]), module=FINETUNE
    )
    assert result.returncode == 0, result.stderr[-8000:]
    if kind == "classification":
        # true/false are one token each: the fast layout, unless turned off
        fast = "one row per candidate" not in name
        said = result.stdout + result.stderr
        assert ("one row per example" in said) == fast, said[-3000:]
    ours, reference = records(str(tmp_path)), single[kind]
    assert [r["iteration"] for r in ours] == [r["iteration"] for r in reference]
    metric = "dev/accuracy" if kind == "classification" else "dev/token_accuracy"
    compared = 0
    for a, b in zip(ours, reference):
        assert a.keys() == b.keys()
        for key in ("lm_loss", "grad_norm", "dev/loss", metric, "final_test/loss"):
            if key in b:
                # bf16 against fp32: the same run within bf16's rounding
                tolerance = dict(rel=2e-2) if name == "bf16" else dict(rel=1e-5, abs=1e-7)
                if name != "bf16" or key != "grad_norm":
                    assert a[key] == pytest.approx(b[key], **tolerance), (name, key)
                compared += 1
    assert compared >= 12
    final = json.load(open(os.path.join(str(tmp_path), "finetune_results.json")))
    assert final["scored_at"] == final["best"]["iteration"]


@pytest.mark.slow
def test_it_starts_from_its_own_checkpoints_and_from_imports_alike(tmp_path, task, single):
    """The dev scores before the first step of a run that starts from a checkpoint (--finetune) are the scores
    that checkpoint's run logged at its last step: from the checkpoint itself, and through export-hf, import-hf."""
    from megatron_glm.convert.cli import main as convert

    source = single["classification folder"]
    logged = [r for r in single["classification"] if "dev/loss" in r][-1]
    hf, imported = str(tmp_path / "hf"), str(tmp_path / "imported")
    assert convert(["export-hf", "--load", source, "--save", hf]) == 0
    assert convert(["import-hf", "--load", hf, "--save", imported]) == 0
    for name, start in (("checkpoint", source), ("import-hf", imported)):
        out = str(tmp_path / name)
        extra = ["--train-iters", "1", "--load", start, "--finetune"]
        result = launch_pretrain(1, argv(task, out, extra=extra), module=FINETUNE)
        assert result.returncode == 0, result.stderr[-8000:]
        first = records(out)[0]
        assert first["iteration"] == 0
        for key in ("dev/loss", "dev/accuracy"):
            assert first[key] == pytest.approx(logged[key], rel=1e-6), (name, key)


@pytest.mark.slow
def test_fine_tuning_beats_the_start_and_chance(tmp_path, task):
    out = str(tmp_path)
    extra = ["--epochs", "6", "--lr", "4e-3", "--eval-interval", "16", "--save", out]
    result = launch_pretrain(1, argv(task, out, extra=extra), module=FINETUNE)
    assert result.returncode == 0, result.stderr[-8000:]
    results = json.load(open(os.path.join(out, "finetune_results.json")))
    start, best = results["zero_shot_dev"]["accuracy"], results["dev"]["accuracy"]
    majority = task[2]
    assert best >= start + 0.1 and best >= majority + 0.1, (start, best, majority)
    assert results["test"]["accuracy"] >= majority + 0.1, results["test"]
    assert os.path.isdir(os.path.join(out, "best", f"iter_{results['best']['iteration']:07d}"))
    assert results["scored_at"] == results["best"]["iteration"]


@pytest.mark.slow
def test_seq2seq_exact_match_rises(tmp_path, task):
    out = str(tmp_path)
    extra = [
        "--epochs",
        "20",
        "--lr",
        "3e-3",
        "--eval-interval",
        "480",
        "--decode",
        "greedy",
        "--max-new-tokens",
        "8",
        "--log-interval",
        "50",
    ]
    result = launch_pretrain(1, argv(task, out, "seq2seq", extra), module=FINETUNE)
    assert result.returncode == 0, result.stderr[-8000:]
    results = json.load(open(os.path.join(out, "finetune_results.json")))
    start, end = results["zero_shot_dev"]["exact_match"], results["test"]
    assert start == 0.0
    assert end["exact_match"] >= 0.5 and end["decoded_exact_match"] >= 0.5, end
    # teacher-forced exact match is greedy decoding's: the two agree on every example
    assert end["exact_match"] == end["decoded_exact_match"]
    assert end["rougeL"] >= end["exact_match"]


@pytest.mark.slow
def test_a_killed_fine_tuning_run_resumes_bitwise(tmp_path, task):
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    common = ["--train-iters", "6", "--eval-interval", "2", "--save-interval", "2"]
    assert (
        launch_pretrain(
            1, argv(task, clean, extra=common + ["--save", clean]), module=FINETUNE
        ).returncode
        == 0
    )
    crashed = launch_pretrain(
        1,
        argv(task, killed, extra=common + ["--save", killed]),
        fault="iteration:3",
        module=FINETUNE,
    )
    assert crashed.returncode != 0 and os.path.isdir(os.path.join(killed, "iter_0000002"))
    result = launch_pretrain(
        1, argv(task, killed, extra=common + ["--save", killed]), module=FINETUNE
    )
    assert result.returncode == 0, result.stderr[-8000:]
    want = [r for r in records(clean) if r["iteration"] > 2]
    got = [r for r in records(killed) if r["iteration"] > 2]
    assert [r["iteration"] for r in got] == [3, 4, 5, 6, 6]  # the last: the best's final scores
    for a, b in zip(got, want):
        timing = ("iteration_time", "tokens_per_s", "tflops", "eta_s", "data_wait_ms")
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }
    a = json.load(open(os.path.join(clean, "finetune_results.json")))
    b = json.load(open(os.path.join(killed, "finetune_results.json")))
    assert a == b
