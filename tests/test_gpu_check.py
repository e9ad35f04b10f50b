"""The GPU check works before a GPU comes: every stage of benchmarks/gpu_check.sh --smoke runs on the CPU."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_gpu_check_smoke_runs_every_stage(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--smoke"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OUT": str(out), "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {s["name"]: s["status"] for s in summary["stages"]} == {
        "kernels": "passed",
        "fp16": "needs a GPU",
        "attention": "passed",
        "throughput-smoke": "passed",
    }
    variants = {r["variant"]: r for r in summary["throughput"]}
    assert set(variants) == {"eager", "flash+fused", "sdpa+compile"}
    assert all(
        r["tokens_per_s"] > 0 and r["last_loss"] == r["last_loss"] for r in variants.values()
    )
    # the same weights and batches: every variant starts from the same loss
    first = [r["first_loss"] for r in variants.values()]
    assert max(first) - min(first) < 1e-3, first
    assert "| 2L h64 | flash+fused |" in (out / "summary.md").read_text()
    assert len(os.listdir(out)) <= 8, "the device tool brings back at most 8 files"
