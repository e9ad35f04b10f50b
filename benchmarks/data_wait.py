"""Step time and the time each step waited for its batches, with the collator inline and in workers.

One run per ``--num-workers`` value, in one invocation, on the same corpus (the demo's: Python's
docstrings, built at run time), the same model and the same seed; the figures are medians of
``iteration_time`` and ``data_wait_ms`` from metrics.jsonl after the first iterations (worker
start-up). The goal: with workers, data wait at most 1% of the step.

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
    shape = ["--preset", args.preset] if args.preset else ["--num-layers", "2", "--hidden-size", "64",
                                                          "--num-attention-heads", "2"]
    cmd = [sys.executable, "-m", "megatron_glm.training.pretrain", "--data-path", data, "--tokenizer-model", model,
           *shape, "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
           "--global-batch-size", str(2 * args.micro_batch_size), "--train-iters", str(args.iters),
           "--bert-prob", "0.5", "--gap-sentence-prob", "0.3", "--split", "100,0,0", "--log-interval", "1",
           "--log-dir", folder, "--device", args.device, "--num-workers", str(workers),
           "--data-cache-path", os.path.join(folder, "cache")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"glm-pretrain --num-workers {workers} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][args.skip:]
    step = statistics.median(r["iteration_time"] for r in rows) * 1000
    wait = statistics.median(r["data_wait_ms"] for r in rows)
    return {"step_ms": step, "wait_ms": wait, "share": wait / step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--preset", default=None,
                   help="a model preset (default: 2 layers, hidden 64: a CPU step short enough that the collator's "
                        "time shows, as a GPU step of a large model would)")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="first iterations left out (start-up)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, model = corpus(os.path.join(tmp, "corpus"))
        print(f"\n{time.strftime('%Y-%m-%d')}, {args.device}, {os.cpu_count()} CPU cores; "
              f"{args.preset or '2 layers x 64'}, seq {args.seq_length}, micro-batch {args.micro_batch_size} x 2 "
              f"accumulation, token/sentence/document objectives; medians of iterations {args.skip + 1}..{args.iters}")
        print(f"{'--num-workers':>13} {'step ms':>9} {'data wait ms':>13} {'wait / step':>12}")
        for workers in args.workers:
            r = run(data, model, workers, os.path.join(tmp, f"w{workers}"), args)
            print(f"{workers:13d} {r['step_ms']:9.1f} {r['wait_ms']:13.2f} {r['share']:12.2%}", flush=True)


if __name__ == "__main__":
    main()
