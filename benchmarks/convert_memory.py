"""Host memory of glm-convert's weight conversions (reshard, export-hf, import-hf), streaming against whole.

A GLM's weights are written as a TP 2 glm-convert checkpoint (fp32, random values). Each
conversion then runs in its own process, and its peak RSS (``ru_maxrss``) is the figure:

- ``reshard`` TP 2 -> TP 1 x PP 2, ``export-hf`` (1 GB shards) and ``import-hf`` back to TP 2.
- Baseline, in the same invocation: the same commands of revision ``BEFORE``, the last whose
  conversions read the whole model (its ``megatron_glm`` package taken out of git with
  ``git archive`` and run from there).

Two depths show whether the peak grows with the model. The largest parameter is the MLP's
``dense_h_to_4h`` (4h x h in fp32).

    python benchmarks/convert_memory.py                  # 8 and 24 layers, hidden 1024, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

BEFORE = "8714d4d"  # the last revision whose reshard, import and export held the whole model
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRAPPER = """
import json, resource, sys
from megatron_glm.convert.cli import main
code = main(sys.argv[2:])
print(json.dumps({"code": code, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

MAKE = """
import sys
import torch
from megatron_glm.config import ModelConfig
from megatron_glm.convert.sources import StateDict
from megatron_glm.convert.writers import write_megatron_glm
from megatron_glm.model.glm import GLMModel
layers, hidden, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=16, vocab_size=8192)
write_megatron_glm(out, StateDict(GLMModel(cfg, seed=0).state_dict(), cfg), tp=2)
"""


def package_at(rev: str, folder: str) -> str:
    """The ``megatron_glm`` package of revision ``rev``, taken out of git into ``folder``; ``folder``."""
    os.makedirs(folder)
    archive = subprocess.run(
        ["git", "archive", rev, "megatron_glm"], capture_output=True, check=True, cwd=ROOT
    )
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder


def peak(package_root: str, argv: list[str]) -> int:
    """Peak RSS of ``glm-convert argv`` run from the package under ``package_root``."""
    env = {**os.environ, "PYTHONPATH": package_root}
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, "-", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=package_root,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines or json.loads(lines[-1])["code"]:
        raise SystemExit(f"glm-convert {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])["peak_rss"]


def commands(work: str, tag: str, ckpt: str) -> dict[str, list[str]]:
    hf = os.path.join(work, f"hf-{tag}")
    return {
        "reshard TP 2 -> TP 1 x PP 2": [
            "reshard",
            "--load",
            ckpt,
            "--save",
            os.path.join(work, f"pp2-{tag}"),
            "--target-pp",
            "2",
        ],
        "export-hf": ["export-hf", "--load", ckpt, "--save", hf, "--max-shard-size", "1GB"],
        "import-hf -> TP 2": [
            "import-hf",
            "--load",
            hf,
            "--save",
            os.path.join(work, f"back-{tag}"),
            "--target-tp",
            "2",
        ],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 24])
    p.add_argument("--hidden-size", type=int, default=1024)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        old = package_at(BEFORE, os.path.join(work, "before"))
        for layers in args.layers:
            ckpt = os.path.join(work, f"tp2-{layers}")
            subprocess.run(
                [sys.executable, "-c", MAKE, str(layers), str(args.hidden_size), ckpt],
                check=True,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": ROOT},
            )
            size = sum(
                os.path.getsize(os.path.join(root, f))
                for root, _, files in os.walk(ckpt)
                for f in files
                if f.endswith(".pt")
            )
            for label, before in commands(work, f"old{layers}", ckpt).items():
                streaming = commands(work, f"new{layers}", ckpt)[label]
                rows.append((label, layers, size, peak(old, before), peak(ROOT, streaming)))
    mib = 2**20
    largest = 4 * args.hidden_size * args.hidden_size * 4
    print(
        f"hidden {args.hidden_size}, fp32; largest parameter {largest / mib:,.0f} MiB; "
        f"baseline: {BEFORE}'s conversions"
    )
    print("| conversion | layers | weights | before (baseline) | streaming | ratio |")
    print("|---|---|---|---|---|---|")
    for label, layers, size, before, streaming in rows:
        print(
            f"| {label} | {layers} | {size / mib:,.0f} MiB | {before / mib:,.0f} MiB | "
            f"{streaming / mib:,.0f} MiB | {streaming / before:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
