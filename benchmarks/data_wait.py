"""Step time and the time each step waited for its batches, with the collator inline and in workers.

One run per ``--num-workers`` value, in one invocation, on the same corpus (the demo's: Python's
docstrings, built at run time), the same model and the same seed; the figures are medians of
``iteration_time`` and ``data_wait_ms`` from metrics.jsonl after the first iterations (worker
start-up). The goal: with workers, data wait at most 1% of the step. First, the loader alone
with a fixed step, which is what a GPU run sees (the CPU is free while the GPU works).

    python benchmarks/data_wait.py                      # a small GLM on the CPU
    python benchmarks/data_wait.py --device cuda --preset glm-large --micro-batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def corpus(workdir: str) -> tuple[str, str]:
    """(dataset prefix, sentencepiece model), built as ``make demo`` builds them."""
    from megatron_glm.demo import main as demo

    demo(["--workdir", workdir, "--skip-training"])
    return os.path.join(workdir, "stdlib_text_document"), os.path.join(workdir, "spm.model")


def run(data, model, workers: int, folder: str, args) -> dict:
    shape = (
        ["--preset", args.preset]
        if args.preset
        else ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2"]
    )
    cmd = [
        sys.executable,
        "-m",
        "megatron_glm.training.pretrain",
        "--data-path",
        data,
        "--tokenizer-model",
        model,
        *shape,
        "--seq-length",
        str(args.seq_length),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--global-batch-size",
        str(2 * args.micro_batch_size),
        "--train-iters",
        str(args.iters),
        "--bert-prob",
        "0.5",
        "--gap-sentence-prob",
        "0.3",
        "--split",
        "100,0,0",
        "--log-interval",
        "1",
        "--log-dir",
        folder,
        "--device",
        args.device,
        "--num-workers",
        str(workers),
        "--data-cache-path",
        os.path.join(folder, "cache"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"glm-pretrain --num-workers {workers} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][args.skip :]
    step = statistics.median(r["iteration_time"] for r in rows) * 1000
    wait = statistics.median(r["data_wait_ms"] for r in rows)
    return {"step_ms": step, "wait_ms": wait, "share": wait / step}


def loader_only(data, model, workers: int, args, step_s: float = 0.05, n: int = 60) -> float:
    """Median ms a micro-batch is waited for when each step takes ``step_s`` (a sleep: a GPU's step leaves
    the CPU free), the loader exactly as the Trainer builds it."""
    from megatron_glm.data.blank_infilling import (
        BlankInfillingCollator,
        BlankInfillingConfig,
        SpecialIds,
    )
    from megatron_glm.data.blended_dataset import build_train_valid_test_datasets
    from megatron_glm.data.loader import BatchStream, MicroBatches
    from megatron_glm.data.sampler import PretrainingSampler
    from megatron_glm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model=model)
    train, _, _ = build_train_valid_test_datasets(
        [data],
        "100,0,0",
        args.seq_length,
        [n * args.micro_batch_size, 0, 0],
        seed=1234,
        tokenizer=tok,
    )
    cfg = BlankInfillingConfig(
        seq_length=args.seq_length, token_prob=0.5, sentence_prob=0.3, seed=1234
    )
    stream = BatchStream(
        MicroBatches(train, BlankInfillingCollator(cfg, SpecialIds.from_tokenizer(tok))),
        PretrainingSampler(len(train), 0, args.micro_batch_size, 0, 1),
        workers,
    )
    waits = []
    try:
        for _ in range(n):
            waits.append(stream.next()[1])
            time.sleep(step_s)
    finally:
        stream.close()
    return 1000 * statistics.median(waits[args.skip :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument(
        "--preset",
        default=None,
        help="a model preset (default: 2 layers, hidden 64: a CPU step short enough that the collator's "
        "time shows, as a GPU step of a large model would)",
    )
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="first iterations left out (start-up)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, model = corpus(os.path.join(tmp, "corpus"))
        print(
            f"\n{time.strftime('%Y-%m-%d')}, {args.device}, {os.cpu_count()} CPU cores; "
            f"{args.preset or '2 layers x 64'}, seq {args.seq_length}, micro-batch {args.micro_batch_size} x 2 "
            f"accumulation, token/sentence/document objectives; medians of iterations {args.skip + 1}..{args.iters}"
        )
        print(
            f"the loader alone, a 50 ms step (a sleep) between micro-batches of {args.micro_batch_size} x "
            f"{args.seq_length}:"
        )
        for workers in args.workers:
            print(
                f"  --num-workers {workers}: {loader_only(data, model, workers, args):.2f} ms waited per micro-batch"
            )
        print(f"\n{'--num-workers':>13} {'step ms':>9} {'data wait ms':>13} {'wait / step':>12}")
        for workers in args.workers:
            r = run(data, model, workers, os.path.join(tmp, f"w{workers}"), args)
            print(
                f"{workers:13d} {r['step_ms']:9.1f} {r['wait_ms']:13.2f} {r['share']:12.2%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
