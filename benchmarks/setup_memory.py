"""Peak host memory per rank while it builds its model: today's meta-device path beside an older commit's.

Each rank's construction runs alone in a fresh process (no process group: the layout is given
explicitly, and the older code's ``parallel.state`` queries are answered with the same
coordinates), so ranks are measured one after another and a layout that would not fit four
times on this machine can still be measured. The figure is the kernel's peak resident set
(VmHWM, reset after imports and a warm-up build) minus the resident set before the build:
what building the weights costs, without the interpreter and libraries.

The baseline is our own older code, loaded from git (``--baseline REV``, default 0d1ae98: every
rank built the whole fp32 model, then sliced it). Usage::

    python benchmarks/setup_memory.py            # glm-large TP1, TP2, TP2xPP2; glm-2b TP2xPP2
    python benchmarks/setup_memory.py --only glm-large:1:1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 30720  # BERT's wordpiece vocabulary (GLM-Large's), padded to a multiple of 256
CASES = ["glm-large:1:1", "glm-large:2:1", "glm-large:2:2", "glm-2b:2:2"]

_COMMON = r"""
import json, sys
from megatron_glm.config import preset
def kib(field):  # the baseline commit has no megatron_glm.training.memory.host_memory: read /proc here
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) * 1024
def reset_host_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
name, tp, pp, tp_rank, pp_rank, vocab = sys.argv[1], *map(int, sys.argv[2:7])
cfg = preset(name, vocab_size=vocab)
def report(build):
    build(preset("glm-tiny", num_layers=pp * 2, vocab_size=256))  # imports and first-use costs, not measured
    reset_host_peak()
    before = kib("VmRSS:")
    params = build(cfg)
    peak = kib("VmHWM:") - before
    print(json.dumps({"peak": peak, "weights": sum(4 * p.numel() for p in params)}))
"""

TODAY = (
    _COMMON
    + r"""
from megatron_glm.model.parallelize import RankLayout, build_rank_model
def build(c):
    chunks = build_rank_model(c, RankLayout(tp_rank, tp, pp_rank, pp), seed=1234)
    return [p for chunk in chunks for p in chunk.parameters()]
report(build)
"""
)

BASELINE = (
    _COMMON
    + r"""
import torch
from megatron_glm.parallel import state
for fn, value in {"get_tensor_model_parallel_world_size": tp, "get_tensor_model_parallel_rank": tp_rank,
                  "get_pipeline_model_parallel_world_size": pp, "get_pipeline_model_parallel_rank": pp_rank}.items():
    setattr(state, fn, lambda value=value: value)
state.check_layout = lambda *a, **k: None
from megatron_glm.model.glm import GLMModel
from megatron_glm.parallel.pipeline_stage import apply_pp
from megatron_glm.parallel.tensor_parallel import apply_tp
def build(c):  # what glm-pretrain did at the baseline commit
    torch.manual_seed(1234)
    model = GLMModel(c)
    apply_tp(model, sequence_parallel=False)
    chunks = apply_pp(model, 1)
    del model
    return [p for chunk in chunks for p in chunk.parameters()]
report(build)
"""
)


def checkout(rev: str, into: str) -> str:
    """The package as it was at ``rev`` (``git archive``), to import instead of today's."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", rev, "megatron_glm", "kernels"],
        check=True,
        capture_output=True,
    ).stdout
    path = os.path.join(into, "archive.tar")
    with open(path, "wb") as f:
        f.write(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(script: str, pythonpath: str, case: str, tp_rank: int, pp_rank: int) -> dict:
    name, tp, pp = case.split(":")
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", script, name, tp, pp, str(tp_rank), str(pp_rank), str(VOCAB)],
        env=env,
        capture_output=True,
        text=True,
        cwd=pythonpath,
    )
    if run.returncode:
        raise SystemExit(f"{case} rank ({pp_rank},{tp_rank}) failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--baseline", default="0d1ae98")
    p.add_argument("--only", nargs="+", default=CASES, help="preset:TP:PP cases")
    p.add_argument(
        "--baseline-ranks",
        choices=["first", "all"],
        default="first",
        help="the baseline builds the same full model on every rank: measure only rank 0 by default",
    )
    args = p.parse_args()
    mib = 2**20
    print(
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores; vocab {VOCAB}; baseline {args.baseline}"
    )
    print(
        f"{'case':16} {'rank (pp,tp)':>12} {'weights MiB':>12} {'today MiB':>10} {'baseline MiB':>13} {'ratio':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        old = checkout(args.baseline, tmp)
        for case in args.only:
            _, tp, pp = case.split(":")
            for pp_rank in range(int(pp)):
                for tp_rank in range(int(tp)):
                    now = measure(TODAY, ROOT, case, tp_rank, pp_rank)
                    first = pp_rank == 0 and tp_rank == 0
                    then = (
                        measure(BASELINE, old, case, tp_rank, pp_rank)
                        if first or args.baseline_ranks == "all"
                        else None
                    )
                    ratio = f"{now['peak'] / then['peak']:.2f}" if then else ""
                    print(
                        f"{case:16} {f'({pp_rank},{tp_rank})':>12} {now['weights'] / mib:12,.0f} "
                        f"{now['peak'] / mib:10,.0f} {then['peak'] / mib if then else float('nan'):13,.0f} "
                        f"{ratio:>6}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
