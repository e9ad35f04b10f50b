"""Host memory of changing layout with the whole training state: the resume per rank, and the conversion.

A GLM is trained one step on TP 2 (ZeRO-1, fp32: weights, masters and Adam moments) and saved.

- **Resume**: glm-pretrain continues it for one step on TP 1 x DP 2 (ZeRO-1) straight from that
  checkpoint. Baseline, in the same invocation: the same run on the same layout started fresh
  (two steps). The figure is the worst rank's peak RSS (``ru_maxrss``).
- **Conversion**: glm-convert to-universal of the checkpoint, in one process. Baseline: the
  conversion as it was before it streamed (revision ``BEFORE``'s package, taken out of git with
  ``git archive``), which held the whole state three times. Both run for two depths, to show
  whether the peak grows with the number of layers.

    python benchmarks/reshard_memory.py                   # 6 and 12 layers, hidden 1024, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from convert_memory import package_at, peak  # this folder's: the script's own path comes first

BEFORE = "a0cde20"  # the last revision whose to-universal held the whole state

WRAPPER = """
import importlib, json, os, resource, sys
out, module = sys.argv[1], sys.argv[2]
code = importlib.import_module(module).main(sys.argv[3:])
with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump({"code": code, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)
os._exit(0)  # past gloo's teardown, as glm-pretrain's own command does
"""


def pretrain_args(data: str, work: str, args, layers: int) -> list[str]:
    return [
        "--data-path",
        os.path.join(data, "stdlib_text_document"),
        "--tokenizer-model",
        os.path.join(data, "spm.model"),
        "--num-layers",
        str(layers),
        "--hidden-size",
        str(args.hidden_size),
        "--num-attention-heads",
        "16",
        "--seq-length",
        "128",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
        "--split",
        "100,0,0",
        "--zero-stage",
        "1",
        "--lr-decay-iters",
        "2",
        "--data-cache-path",
        os.path.join(work, "cache"),
    ]


def measured(folder: str, nproc: int, module: str, argv: list[str]) -> int:
    """The worst rank's peak RSS of ``module`` run with ``argv`` in ``nproc`` processes."""
    os.makedirs(folder)
    wrapper = os.path.join(folder, "wrapper.py")
    with open(wrapper, "w") as f:
        f.write(WRAPPER)
    cmd = [sys.executable, wrapper, folder, module, *argv]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            *cmd[1:],
        ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    files = [os.path.join(folder, f"rank{r}.json") for r in range(nproc)]
    ranks = [json.load(open(f)) for f in files if os.path.exists(f)]
    if done.returncode or len(ranks) < nproc or any(r["code"] for r in ranks):
        raise SystemExit(f"{module} {' '.join(argv[-6:])} failed:\n{done.stderr[-3000:]}")
    return max(r["peak_rss"] for r in ranks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    p.add_argument("--hidden-size", type=int, default=1024)
    args = p.parse_args(argv)
    from megatron_glm.demo import main as demo

    rows, conversions = [], []
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "data")
        demo(["--workdir", data, "--skip-training"])
        old = package_at(BEFORE, os.path.join(work, "before"))
        for layers in args.layers:
            base = pretrain_args(data, work, args, layers)
            save = os.path.join(work, f"tp2-{layers}")
            measured(
                os.path.join(work, f"make{layers}"),
                2,
                "megatron_glm.training.pretrain",
                [*base, "--tensor-model-parallel-size", "2", "--train-iters", "1", "--save", save],
            )
            two = [*base, "--train-iters", "2"]
            fresh = measured(
                os.path.join(work, f"fresh{layers}"), 2, "megatron_glm.training.pretrain", two
            )
            resumed = measured(
                os.path.join(work, f"resume{layers}"),
                2,
                "megatron_glm.training.pretrain",
                [*two, "--load", save],
            )
            rows.append((layers, fresh, resumed))
            streamed = measured(
                os.path.join(work, f"convert{layers}"),
                1,
                "megatron_glm.convert.cli",
                ["to-universal", "--load", save, "--save", os.path.join(work, f"u{layers}")],
            )
            before = peak(
                old, ["to-universal", "--load", save, "--save", os.path.join(work, f"old{layers}")]
            )
            state = sum(
                os.path.getsize(os.path.join(root, f))
                for root, _, files in os.walk(os.path.join(work, f"u{layers}"))
                for f in files
                if f in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt")
            )
            conversions.append((layers, state, before, streamed))
    mib = 2**20
    print(f"hidden {args.hidden_size}, fp32, ZeRO-1; saved on TP 2, resumed on TP 1 x DP 2")
    print("| layers | fresh start (baseline) | resume from TP 2 | ratio |")
    print("|---|---|---|---|")
    for layers, fresh, resumed in rows:
        print(
            f"| {layers} | {fresh / mib:,.0f} MiB | {resumed / mib:,.0f} MiB | {resumed / fresh:.2f}x |"
        )
    print()
    print(
        "| layers | fp32 state (weights + 2 moments) | to-universal before (baseline) | streaming | ratio |"
    )
    print("|---|---|---|---|---|")
    for layers, state, before, streamed in conversions:
        print(
            f"| {layers} | {state / mib:,.0f} MiB | {before / mib:,.0f} MiB | "
            f"{streamed / mib:,.0f} MiB | {streamed / before:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
