"""glm-eval and --eval-tasks: every metric against a computation by hand on a tiny fixed model, data parallel
against one process, an HF export against its checkpoint, training-time tasks against glm-eval, bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import launch_pretrain, records, write_jsonl

TEXTS = [
    "Return the number of items in the container.",
    "Open the file and return a stream.",
    "Raise ValueError if the value is not valid.",
    "Return a copy of the string with its first character capitalized and the rest lowercased.",
    "Remove and return an arbitrary element from the set.",
]


def pretrain_argv(data, save, iters=4, extra=()):
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
        "--bert-prob",
        "0.5",
        "--gap-sentence-prob",
        "0.3",
        "--split",
        "90,10,0",
        "--eval-interval",
        str(iters),
        "--eval-iters",
        "1",
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


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("tasks")
    texts = corpus[1][-40:]  # the end of the corpus: a split's held-out documents are like them
    files = {
        "blank": str(root / "docs.jsonl"),
        "choice": str(root / "mc.jsonl"),
        "lambada": str(root / "lambada.jsonl"),
    }
    write_jsonl(files["blank"], [{"text": t} for t in texts[:6]])
    write_jsonl(files["lambada"], [{"text": t} for t in TEXTS])
    mc = []
    for i, t in enumerate(TEXTS):
        words = t.rstrip(".").split()
        mc.append(
            {
                "text": " ".join(words[:-1]) + " [MASK].",
                "choices": [words[-1], "banana", "the"][: 2 + i % 2],
                "label": 0,
            }
        )
    write_jsonl(files["choice"], mc)
    return files


@pytest.fixture(scope="module")
def model(tokenizer):
    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel

    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        vocab_size=tokenizer.padded_vocab_size(),
        max_position_embeddings=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return GLMModel(cfg).eval()


def part_a_cached(model, row):
    """A KV cache holding the row's Part A, encoded bidirectionally once (as glm-generate does)."""
    from megatron_glm.model.glm import KVCache

    cache = KVCache(model.cfg.num_layers)
    n = len(row.part_a)
    model(
        torch.tensor([row.part_a]),
        torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)])[None],
        torch.zeros(1, n, dtype=torch.int32),
        torch.full((1, n), n, dtype=torch.int32),
        cache,
    )
    return cache


def by_hand(model, row):
    """(nll sum, targets, argmax-correct targets) of a row, one token at a time through the KV cache."""
    from megatron_glm.model.generation import _feed

    with torch.no_grad():
        cache = part_a_cached(model, row)
        nll, correct = 0.0, 0
        for j, (token, target) in enumerate(zip(row.part_b, row.targets)):
            logits = _feed(
                model,
                cache,
                torch.tensor([[token]]),
                torch.tensor([[row.mask_pos]]),
                torch.tensor([[j + 1]]),
                model.cfg.vocab_size,
            )[0].float()
            nll -= float(torch.log_softmax(logits, -1)[target])
            correct += int(int(logits.argmax()) == target)
    return nll, len(row.targets), correct


def greedy_span(model, row, max_new, eop):
    """glm-generate's greedy filling of the row's blank, given Part A alone."""
    from megatron_glm.model.generation import GenerationConfig, _span_greedy_or_sample

    with torch.no_grad():
        cache = part_a_cached(model, row)
        return _span_greedy_or_sample(
            model,
            cache,
            row.mask_pos,
            row.part_b[0],
            eop,
            GenerationConfig(max_new_tokens=max_new),
            None,
            "cpu",
            model.cfg.vocab_size,
        )


def test_rows_are_the_tasks_as_blank_filling(tokenizer, task_files):
    from megatron_glm.data import eval_tasks

    rows, labels = eval_tasks.choice_rows(task_files["choice"], tokenizer, 128)
    assert labels == [0] * 5 and len(rows) == 2 + 3 + 2 + 3 + 2
    first = rows[0]
    assert first.part_a == tokenizer.encode(
        "Return the number of items in the [MASK].", allow_special=True
    )
    assert first.part_a[first.mask_pos] == tokenizer.mask_id
    assert (
        first.targets == tokenizer.encode("container")
        and first.part_b == [tokenizer.sop_id] + first.targets[:-1]
    )
    lam = eval_tasks.lambada_rows(task_files["lambada"], tokenizer, 128)
    assert lam[0].part_a[-1] == tokenizer.gmask_id and lam[0].mask_pos == len(lam[0].part_a) - 1
    assert tokenizer.decode(lam[0].part_a[:-1] + lam[0].targets) == TEXTS[0]
    collator = eval_tasks.blank_collator(tokenizer, 128, 1234)
    spans = eval_tasks.blank_rows(task_files["blank"], tokenizer, 128, collator)
    doc = tokenizer.encode(json.loads(open(task_files["blank"]).readline())["text"])
    plan = collator.plan(0, np.asarray(doc[: 128 - collator.cfg.max_span_length - 2]))
    of_doc = [r for r in spans if r.item == 0]
    assert len(of_doc) == len(plan.starts) >= 1
    # the collator's token-objective spans, one row each
    for r, s, n in zip(of_doc, plan.starts, plan.lengths):
        assert r.part_b[1:] == doc[s : s + n] and r.targets == doc[s : s + n] + [tokenizer.eop_id]
        assert r.part_a.count(tokenizer.mask_id) == len(plan.starts)


def test_scores_equal_a_token_by_token_computation(model, tokenizer, task_files):
    """Batched, padded scoring against one token at a time through the KV cache; and a span is an exact match
    exactly when glm-generate's greedy filling reproduces it and stops."""
    from megatron_glm.data import eval_tasks
    from megatron_glm.evaluate import score

    rows = (
        eval_tasks.choice_rows(task_files["choice"], tokenizer, 128)[0]
        + eval_tasks.lambada_rows(task_files["lambada"], tokenizer, 128)
        + eval_tasks.blank_rows(
            task_files["blank"], tokenizer, 128, eval_tasks.blank_collator(tokenizer, 128, 1234)
        )
    )
    # rows whose targets are the model's own greedy filling: exact matches, so the metric is not always 0
    greedy = []
    for row in rows[-4:]:
        span = greedy_span(model, row, 6, tokenizer.eop_id) or [tokenizer.eop_id]
        greedy.append(
            eval_tasks.Row(row.part_a, row.mask_pos, row.part_b[:1] + span[:-1], span, 99)
        )
    rows += greedy
    batches = [
        eval_tasks.layout(rows[i : i + 5], max(map(len, rows[i : i + 5])), tokenizer.pad_id)
        for i in range(0, len(rows), 5)
    ]
    got = score(model, batches, "cpu")
    for row, (nll, count, correct) in zip(rows, got):
        want = by_hand(model, row)
        assert nll == pytest.approx(want[0], rel=1e-5) and (count, correct) == want[1:]
    for row, (_, count, correct) in zip(rows, got):
        # blank rows: exact match <=> greedy generation gives the span
        if row.targets[-1] == tokenizer.eop_id:
            span = greedy_span(model, row, len(row.targets) + 2, tokenizer.eop_id)
            assert (correct == count) == (span + [tokenizer.eop_id] == row.targets)
    assert all(c == n for _, n, c in got[-4:])


def test_metrics_from_scores_by_hand():
    from megatron_glm.data.eval_tasks import Row, metrics

    r = [Row([1], 0, [2, 3], [3, 4], item) for item in (0, 0, 0, 1, 1)]
    scores = np.array([[3.0, 2, 1], [2.0, 1, 1], [4.0, 4, 0], [1.0, 1, 1], [0.5, 1, 0]])
    # item 0: sums 3, 2, 4 -> choice 1; per token 1.5, 2, 1 -> choice 2. item 1: 1, 0.5 -> choice 1 both ways
    m = metrics("choice", r, scores, [1, 0])
    assert m == {
        "accuracy": 0.5,
        "accuracy_per_token": 0.0,
        "chance": (1 / 3 + 1 / 2) / 2,
        "items": 2,
    }
    m = metrics("blank", r, scores)
    assert m["exact_match"] == pytest.approx(2 / 5) and m["token_accuracy"] == pytest.approx(3 / 9)
    assert m["loss"] == pytest.approx(10.5 / 9)
    m = metrics("lambada", r, scores)
    assert m["accuracy"] == pytest.approx(2 / 5) and m["perplexity"] == pytest.approx(
        math.exp(10.5 / 9)
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data, task_files):
    """4 steps with --eval-tasks at step 4, saved at 4: the tasks' values in metrics.jsonl, and a checkpoint."""
    save = str(tmp_path_factory.mktemp("evaluated") / "ckpt")
    tasks = [f"{kind}:{path}" for kind, path in task_files.items()]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_glm.training.pretrain",
            *pretrain_argv(data, save, extra=["--eval-tasks", *tasks]),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return save


def glm_eval(argv, nproc=1, module="megatron_glm.evaluate"):
    """glm-eval (or another command's ``module``) in ``nproc`` processes under torchrun."""
    return launch_pretrain(nproc, argv, module=module)


def eval_argv(checkpoint, task_files, out, cache):
    tasks = [arg for kind, path in task_files.items() for arg in ("--task", f"{kind}:{path}")]
    argv = ["--load", checkpoint, *tasks, "--lm-samples", "12", "--batch-size", "3"]
    return argv + ["--output", out, "--data-cache-path", cache]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, checkpoint, task_files):
    """glm-eval's results on the checkpoint in one process: what every other way of scoring it must give."""
    root = tmp_path_factory.mktemp("one-process")
    out = str(root / "one.json")
    done = glm_eval(eval_argv(checkpoint, task_files, out, str(root / "cache")))
    assert done.returncode == 0, done.stderr[-5000:]
    assert "choice:mc.jsonl: accuracy" in done.stdout
    return json.load(open(out))["tasks"]


@pytest.mark.slow
def test_glm_eval_data_parallel_hf_export_and_training_agree(
    tmp_path, checkpoint, task_files, one_process
):
    from megatron_glm.convert.cli import main as convert

    results = {"one": one_process}
    for name, load, nproc in (
        ("dp2", checkpoint, 2),
        ("hf", str(tmp_path / "hf"), 1),
    ):
        if name == "hf":
            assert convert(["export-hf", "--load", checkpoint, "--save", load]) == 0
        out = str(tmp_path / f"{name}.json")
        done = glm_eval(eval_argv(load, task_files, out, str(tmp_path / "cache")), nproc)
        assert done.returncode == 0, done.stderr[-5000:]
        results[name] = json.load(open(out))["tasks"]
    assert results["dp2"] == results["one"], (
        "two data-parallel ranks give exactly one process's numbers"
    )
    one, hf = results["one"], results["hf"]
    assert hf.keys() == one.keys()
    for task in one:
        for key, value in one[task].items():
            assert hf[task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)
    assert {"loss_token", "loss_sentence", "loss_document"} <= set(one["lm"])
    trained = {k: v for k, v in records(checkpoint)[-1].items() if k.startswith("eval/")}
    for task in ("blank:docs.jsonl", "choice:mc.jsonl", "lambada:lambada.jsonl"):
        for key, value in one[
            task
        ].items():  # the same numbers at the same step, computed inside training
            assert trained[f"eval/{task}/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-9), (
                task,
                key,
            )


@pytest.mark.slow
def test_glm_eval_with_tensor_and_pipeline_parallelism_equals_one_process(
    tmp_path, checkpoint, task_files, one_process
):
    """A TP 1 checkpoint scored on TP 2 and on TP 2 x PP 2 (each rank reading only its shard): every task
    kind, and the objective's loss, equal one process's."""
    results = {"one": one_process}
    for name, nproc, extra in (
        ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
        (
            "tp2pp2",
            4,
            ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
        ),
    ):
        out = str(tmp_path / f"{name}.json")
        argv = eval_argv(checkpoint, task_files, out, str(tmp_path / "cache")) + extra
        done = glm_eval(argv, nproc)
        assert done.returncode == 0, done.stderr[-5000:]
        results[name] = json.load(open(out))["tasks"]
    one = results["one"]
    for name in ("tp2", "tp2pp2"):
        assert results[name].keys() == one.keys()
        for task in one:
            assert results[name][task].keys() == one[task].keys()
            for key, value in one[task].items():
                assert results[name][task][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (
                    name,
                    task,
                    key,
                )
    tasks = [arg for kind, path in task_files.items() for arg in ("--task", f"{kind}:{path}")]
    bad = glm_eval(["--load", checkpoint, *tasks, "--tensor-model-parallel-size", "3"], 2)
    assert bad.returncode == 1 and "glm-eval: error:" in bad.stderr, bad.stderr[-3000:]


@pytest.mark.slow
def test_glm_generate_with_tensor_and_pipeline_parallelism_writes_what_one_process_writes(
    checkpoint,
):
    """Greedy filling and beam search on TP 2, TP 1 x PP 2 and TP 2 x PP 2, each rank reading only its shard
    of a TP 1 checkpoint: rank 0 prints exactly one process's fills."""
    from megatron_glm.generate import load_for_inference
    from megatron_glm.model.generation import GenerationConfig, fill_blanks

    texts = ["Return the [MASK] of the file.", "Open a file [gMASK]"]
    model, tokenizer, _ = load_for_inference(checkpoint)
    one = {
        strategy: [
            fill_blanks(model, tokenizer, t, GenerationConfig(strategy, max_new_tokens=6))[0]
            for t in texts
        ]
        for strategy in ("greedy", "beam")
    }
    for strategy, tp, pp in (("greedy", 2, 1), ("beam", 2, 1), ("beam", 1, 2), ("greedy", 2, 2)):
        argv = ["--load", checkpoint, *(a for t in texts for a in ("--text", t))]
        argv += ["--strategy", strategy, "--max-new-tokens", "6"]
        argv += ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
        done = glm_eval(argv, tp * pp, module="megatron_glm.generate")
        assert done.returncode == 0, done.stderr[-4000:]
        printed = [line for line in done.stdout.splitlines() if line.strip()]  # rank 0 alone
        assert printed == one[strategy], (strategy, tp, pp)


@pytest.mark.parametrize(
    "kind, rows, message",
    [
        (
            "choice",
            [{"text": "no blank here", "choices": ["a", "b"], "label": 0}],
            "has 0 [MASK] blanks",
        ),
        (
            "choice",
            [{"text": "a [MASK] b", "choices": ["a", "b"], "label": 2}],
            "is not an index into its 2 choices",
        ),
        (
            "choice",
            [{"text": "a [MASK] b", "choices": ["a", "b", "a"], "label": 2}],
            "\"choices\" repeat ['a']",
        ),
        ("lambada", [], "holds no items: an empty lambada task file"),
        ("blank", [{"txt": "x"}], 'needs a non-empty "text"'),
    ],
)
@pytest.mark.slow
def test_bad_task_files_are_named(tmp_path, checkpoint, kind, rows, message):
    path = str(tmp_path / "task.jsonl")
    write_jsonl(path, rows)
    done = glm_eval(["--load", checkpoint, "--task", f"{kind}:{path}"])
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, (
        done.stderr[-3000:]
    )


def test_a_tokenizer_that_does_not_match_is_refused(tmp_path, checkpoint, task_files, corpus):
    from megatron_glm.data_prep.train_tokenizer import train_tokenizer

    other = train_tokenizer([corpus[0]], str(tmp_path / "other"), vocab_size=1200, threads=2)
    done = glm_eval(
        [
            "--load",
            checkpoint,
            "--task",
            f"lambada:{task_files['lambada']}",
            "--tokenizer-model",
            other,
        ]
    )
    assert done.returncode == 1 and "was trained with another tokenizer" in done.stderr, (
        done.stderr[-3000:]
    )
    assert "Traceback" not in done.stderr
