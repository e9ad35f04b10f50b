"""How long a checkpoint stalls training: synchronous saves against ``--async-save``, side by side.

Three glm-pretrain runs per round, on the same corpus (the demo's, built at run time), model
and seed: no save (the baseline), ``--save-interval K`` and ``--save-interval K --async-save``;
rounds alternate the modes so that a noisy machine weighs on all of them alike. The stall of a
save is the loop's extra time over the baseline's (the sum of ``iteration_time`` in
metrics.jsonl, which counts a save in the iteration after it), divided by the saves inside the
loop. Beside it, the time each save held the loop, from the run's log: the whole write when
synchronous, the host copy (and any wait for the previous save) when asynchronous. The goal:
the async stall is no more than the host copy.

    python benchmarks/checkpoint_stall.py                 # 6 layers x 512 on the CPU
    python benchmarks/checkpoint_stall.py --layers 12 --hidden 768 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

MODES = {
    "no save": [],
    "sync": ["--save-interval", "{k}"],
    "async": ["--save-interval", "{k}", "--async-save"],
}
HELD = re.compile(r"(?:saved \S+ \(|training held )([0-9.]+) s")
COPY = re.compile(r"host copy ([0-9.]+) s")


def corpus(workdir: str) -> tuple[str, str]:
    from megatron_glm.demo import main as demo

    demo(["--workdir", workdir, "--skip-training"])
    return os.path.join(workdir, "stdlib_text_document"), os.path.join(workdir, "spm.model")


def run(data, model, mode: str, folder: str, args) -> dict:
    extra = [flag.format(k=args.interval) for flag in MODES[mode]]
    save = ["--save", os.path.join(folder, "ckpt")] if extra else []
    cmd = [
        sys.executable,
        "-m",
        "megatron_glm.training.pretrain",
        "--data-path",
        data,
        "--tokenizer-model",
        model,
        "--num-layers",
        str(args.layers),
        "--hidden-size",
        str(args.hidden),
        "--num-attention-heads",
        str(args.hidden // 64),
        "--seq-length",
        str(args.seq_length),
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "2",
        "--train-iters",
        str(args.iters),
        "--split",
        "100,0,0",
        "--log-interval",
        "1",
        "--log-dir",
        folder,
        "--data-cache-path",
        os.path.join(folder, "cache"),
        *save,
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"glm-pretrain ({mode}) failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        times = [json.loads(line)["iteration_time"] for line in f]
    log = done.stdout + done.stderr
    held = [float(m.group(1)) for m in HELD.finditer(log)][
        :-1
    ]  # the last save is at the end of the run
    copy = [float(m.group(1)) for m in COPY.finditer(log)][:-1]
    return {
        "loop_s": sum(times[1:]),
        "step_s": statistics.median(times[1:]),
        "held": held,
        "copy": copy,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--iters", type=int, default=13)
    p.add_argument(
        "--interval", type=int, default=3, help="--save-interval (saves at 3, 6, 9 stall the loop)"
    )
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    saves = (args.iters - 1) // args.interval  # the saves followed by a timed iteration
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        data, model = corpus(os.path.join(tmp, "corpus"))
        for r in range(args.rounds):
            for mode in MODES:
                results[mode].append(
                    run(data, model, mode, os.path.join(tmp, f"{r}-{mode.replace(' ', '')}"), args)
                )
        ckpt = os.path.join(tmp, "0-sync", "ckpt")
        size = sum(
            os.path.getsize(os.path.join(root, n))
            for root, _, names in os.walk(ckpt)
            for n in names
        ) / max(len([n for n in os.listdir(ckpt) if n.startswith("iter_")]), 1)
    base = statistics.median(r["loop_s"] for r in results["no save"])
    print(
        f"\n{time.strftime('%Y-%m-%d')}, CPU, {os.cpu_count()} cores; {args.layers} layers x {args.hidden}, "
        f"seq {args.seq_length}, micro-batch 2; a checkpoint (weights + Adam) is {size / 2**20:,.0f} MiB; "
        f"{saves} saves in {args.iters - 1} timed iterations; medians of {args.rounds} rounds"
    )
    print(
        f"{'mode':>8} {'step ms':>8} {'loop s':>7} {'stall / save s':>15} {'loop held / save s':>19} "
        f"{'host copy s':>12}"
    )
    for mode, rows in results.items():
        loop = statistics.median(r["loop_s"] for r in rows)
        step = 1000 * statistics.median(r["step_s"] for r in rows)
        stall = (loop - base) / saves if mode != "no save" else 0.0
        held = statistics.median(h for r in rows for h in r["held"]) if mode != "no save" else 0.0
        copy = (
            statistics.median(c for r in rows for c in r["copy"])
            if mode == "async"
            else float("nan")
        )
        print(f"{mode:>8} {step:8.0f} {loop:7.2f} {stall:15.2f} {held:19.2f} {copy:12.2f}")


if __name__ == "__main__":
    main()
