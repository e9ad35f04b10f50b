"""A fine-tuning step against a pretraining step of the same rows: what glm-finetune adds per row.

The same model, sequence length and rows per micro-batch: glm-pretrain on the demo's corpus
(blank infilling), glm-finetune's seq2seq with the same micro-batch, and its classification
(2 candidates, one row each) with half the examples per micro-batch, so every step runs the same
number of rows through the same shapes. The runs alternate, ``--rounds`` times each; the figures
are medians of ``iteration_time`` and ``data_wait_ms`` (metrics.jsonl) after ``--skip`` warm-up
steps, and the ratios are to pretraining's median in the same invocation. The goal: at most
1.1x a pretraining step, data wait under 1% of the step.

    python benchmarks/finetune_step.py                    # a small GLM on the CPU
    python benchmarks/finetune_step.py --device cuda --num-layers 24 --hidden-size 1024 --heads 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile


def prepare(workdir: str) -> dict:
    """The demo's corpus and tokenizer, and two fine-tuning tasks made from its docstrings."""
    from megatron_glm.demo import main as demo

    demo(["--workdir", workdir, "--skip-training"])
    with open(os.path.join(workdir, "stdlib_docstrings.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    sentences = [t.strip().split("\n")[0] for t in texts]
    sentences = [s for s in sentences if 4 <= len(s.split()) <= 30]
    random.Random(0).shuffle(sentences)
    cls = os.path.join(workdir, "cls.jsonl")
    s2s = os.path.join(workdir, "s2s.jsonl")
    with open(cls, "w") as f:
        for s in sentences[:2000]:
            label = int(s.lower().startswith("return"))
            f.write(json.dumps({"sentence": s, "label": label}) + "\n")
    with open(s2s, "w") as f:
        for s in sentences[:2000]:
            words = s.split()
            f.write(
                json.dumps({"source": " ".join(words[:-3]), "target": " ".join(words[-3:])}) + "\n"
            )
    return {
        "data": os.path.join(workdir, "stdlib_text_document"),
        "spm": os.path.join(workdir, "spm.model"),
        "cls": cls,
        "s2s": s2s,
    }


def run(kind: str, files: dict, folder: str, args) -> dict:
    common = [
        "--tokenizer-model",
        files["spm"],
        "--num-layers",
        str(args.num_layers),
        "--hidden-size",
        str(args.hidden_size),
        "--num-attention-heads",
        str(args.heads),
        "--seq-length",
        str(args.seq_length),
        "--train-iters",
        str(args.iters),
        "--log-interval",
        "1",
        "--log-dir",
        folder,
        "--device",
        args.device,
        "--num-workers",
        "2",
        "--eval-interval",
        str(10 * args.iters),
    ]
    mb = args.micro_batch_size
    if kind == "pretrain":
        module = "megatron_glm.training.pretrain"
        own = ["--data-path", files["data"], "--split", "100,0,0"]
        own += ["--data-cache-path", os.path.join(folder, "cache")]
    elif kind == "seq2seq":
        module = "megatron_glm.training.finetune"
        own = ["--task", "seq2seq", "--train-data", files["s2s"]]
    else:
        module = "megatron_glm.training.finetune"
        own = ["--task", "classification", "--train-data", files["cls"]]
        own += [
            "--pattern",
            "{sentence} Does it return? [MASK].",
            "--verbalizer",
            "yes it does",
            "no",
        ]
        # two rows (a candidate each) per example: half the examples give the same rows
        mb //= 2
    batch = ["--micro-batch-size", str(mb), "--global-batch-size", str(2 * mb)]
    done = subprocess.run(
        [sys.executable, "-m", module, *common, *own, *batch], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if "iteration_time" in r][args.skip :]
    return {
        "step_ms": [1000 * r["iteration_time"] for r in rows],
        "wait_ms": [r["data_wait_ms"] for r in rows],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    kinds = ("pretrain", "seq2seq", "classification")
    with tempfile.TemporaryDirectory() as work:
        files = prepare(os.path.join(work, "data"))
        samples = {k: {"step_ms": [], "wait_ms": []} for k in kinds}
        for r in range(args.rounds):
            for kind in kinds:
                got = run(kind, files, os.path.join(work, f"{kind}-{r}"), args)
                for key in got:
                    samples[kind][key] += got[key]
    base = statistics.median(samples["pretrain"]["step_ms"])
    print(
        f"{args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, "
        f"{args.micro_batch_size} rows per micro-batch, 2 micro-batches per step, device {args.device}"
    )
    print("| run | step | vs pretraining | data wait per step | wait / step |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        step = statistics.median(samples[kind]["step_ms"])
        wait = statistics.median(samples[kind]["wait_ms"])
        print(
            f"| {kind} | {step:,.1f} ms | {step / base:.3f}x | {wait:.2f} ms | {wait / step:.2%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
