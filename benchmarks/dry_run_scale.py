"""GLM-130B as published, dry-run on this machine: the per-rank table behind docs/SCALE.md.

Three things, each in its own ``glm-pretrain --dry-run`` process (its wall time and peak resident
memory measured):

1. GLM-130B's own job (Zeng et al. 2022, §2.3 and Table 11): 96 DGX-A100 nodes of 8 x 40 GB, TP 4 x
   PP 8 x DP 24, the first and last stages 8 layers and the six others 9, ZeRO-1, fp16, full
   recomputation, micro-batch 1, global batch 4,224, sequence 2,048;
2. glm-plan's estimate of that same layout beside it, and glm-plan's modelled step time beside the
   88.5 s per iteration the GLM-130B training log reports;
3. the layout glm-plan recommends for that cluster, dry-run: either it fits in 40 GB, or glm-plan
   should not recommend it.

Usage::

    python benchmarks/dry_run_scale.py              # all three (about 10 minutes on 2 cores)
    python benchmarks/dry_run_scale.py --only published
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_glm.config import preset  # noqa: E402
from megatron_glm.plan.memory import Layout, Workload  # noqa: E402
from megatron_glm.plan.search import Cluster, GiB, evaluate, rank  # noqa: E402
from megatron_glm.plan.verify import dry_run_argv  # noqa: E402

VOCAB = 150528  # GLM-130B's IceTokenizer (configs/model_glm_130b.sh)
REPORTED_STEP_S = 88.5  # the GLM-130B training log, at batch 4,224
# DGX-A100: 8 x A100-SXM4-40GB (312 dense fp16 TFLOPS each), NVLink 3 (300 GB/s per GPU one way),
# 8 x 200 Gb/s HDR InfiniBand per node (25 GB/s per GPU)
CLUSTER = Cluster(
    nodes=96,
    gpus_per_node=8,
    gpu_memory_gib=40.0,
    peak_tflops=312.0,
    intra_node_gbps=300.0,
    inter_node_gbps=25.0,
)
WORKLOAD = Workload(preset("glm-130b", vocab_size=VOCAB), 2048, 4224, "fp16", "flash", "cuda")
PUBLISHED = Layout(
    tp=4, pp=8, dp=24, micro_batch=1, zero=1, recompute="full", ends=(8, 8)
)  # 8 + 6 x 9 + 8 = 70 layers


def dry_run(argv: list[str]) -> dict:
    """One ``glm-pretrain --dry-run`` in its own process: its report, wall seconds and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "megatron_glm.training.pretrain", *argv, "--log-dir", tmp]
        start = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.monotonic() - start
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1], "wall_s": wall}
        with open(os.path.join(tmp, "dry_run.json")) as f:
            report = json.load(f)
    return {
        **report,
        "table": done.stdout.strip(),
        "wall_s": wall,
        # the largest child so far: a later child's peak shows only when it is the largest
        "peak_rss_gib": rss * 1024 / GiB,
    }


def stage_rows(candidate, report) -> str:
    """Markdown: per impersonated rank, the dry run's figures beside glm-plan's for that stage."""
    rows = [
        "| rank (TP/PP/DP) | layers | params | weights | grads | optimizer | activations (traced) | "
        "peak (dry run) | peak (glm-plan) | set-up host | TP MiB | PP MiB | DP MiB (arith.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["ranks"]:
        st = candidate.stages[r["pp_rank"]]
        t = r["traffic"]
        rows.append(
            f"| {r['rank']} ({r['tp_rank']}/{r['pp_rank']}/{r['dp_rank']}) | {r['layers']} | "
            f"{r['parameters'] / 1e9:.2f}B | {r['weights'] / GiB:.2f} | {r['gradients'] / GiB:.2f} | "
            f"{r['optimizer'] / GiB:.2f} | {r['activations_peak'] / GiB:.2f} | {r['peak'] / GiB:.2f} | "
            f"{st.peak / GiB:.2f} | {r['setup_host'] / GiB:.2f} | {t.get('tp', 0) / 2**20:,.0f} | "
            f"{t.get('pp', 0) / 2**20:,.0f} | {t.get('dp', 0) / 2**20:,.0f} |"
        )
    return "\n".join(rows)


def section(title: str, candidate) -> dict:
    """Dry-run one layout and print its heading, command and per-rank table; the report."""
    argv = dry_run_argv(WORKLOAD, candidate, CLUSTER)
    report = dry_run(argv)
    print(f"## {title}\n")
    print("glm-pretrain " + " ".join(argv) + "\n")
    if "error" in report:
        print(f"dry run failed: {report['error']}")
    else:
        print(stage_rows(candidate, report))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["published", "recommended"])
    args = p.parse_args()
    out = {}
    budget = (CLUSTER.gpu_memory_gib - CLUSTER.reserve_gib) * GiB
    if args.only in (None, "published"):
        cand = evaluate(WORKLOAD, PUBLISHED, CLUSTER)
        title = f"GLM-130B as published: {PUBLISHED.label}, {CLUSTER.world} ranks"
        report = out["published"] = section(title, cand)
        if "error" not in report:
            print(
                f"\ndry run: {report['wall_s']:.0f} s, peak RSS {report['peak_rss_gib']:.2f} GiB; "
                f"glm-plan's modelled step {cand.step_time:.1f} s (efficiency {CLUSTER.efficiency}) vs "
                f"{REPORTED_STEP_S} s in the GLM-130B log; bubble {cand.bubble:.1%}\n"
            )
    if args.only in (None, "recommended"):
        best = rank(WORKLOAD, CLUSTER)[0]
        title = f"glm-plan's recommendation for the same cluster: {best.layout.label}"
        report = out["recommended"] = section(title, best)
        if "error" not in report:
            worst = max(r["peak"] for r in report["ranks"])
            verdict = "fits" if worst <= budget else "does NOT fit"
            print(
                f"\ndry run: {report['wall_s']:.0f} s, peak RSS {report['peak_rss_gib']:.2f} GiB; "
                f"worst traced peak {worst / GiB:.2f} GiB {verdict} in {budget / GiB:.0f} GiB "
                f"(40 GiB less glm-plan's reserve); glm-plan's step {best.step_time:.1f} s\n"
            )
    print(
        json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in out.items()})
    )


if __name__ == "__main__":
    main()
