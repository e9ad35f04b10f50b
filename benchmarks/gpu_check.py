"""The one GPU check: every GPU path of the project on one H100/H200 in at most 7 minutes.

Stages, in order, each under its own time limit, each writing to ``--out`` as it ends (a run
cut short still brings back what finished):

1. kernels: ``tests/test_kernels.py`` on CUDA (flash attention forward and backward, dropout,
   learned and rotary 2D, packed segments, odd lengths, fp16 and bf16; masked softmax, 2D
   embedding, 2D rotary) against the torch references;
2. fp16: the injected-overflow test of dynamic loss scaling (``tests/test_3d.py``);
3. attention: ``benchmarks/attention.py`` at seq 2048 and 8192 (ours, FlexAttention, SDPA dense,
   SDPA causal);
4. throughput: ``benchmarks/train_throughput.py`` for glm-large at seq 512 and glm-2b at seq 1024,
   bf16, with glm-plan's peak beside the measured one (stage 5 of the issue);
5. summary: ``summary.json`` and ``summary.md`` (a table for docs/PERFORMANCE.md).

``--smoke`` runs every stage on the CPU with tiny shapes (Triton interpreted): CI runs it so
that the script works when a GPU comes. The fp16 stage needs a GPU and says so there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stages(smoke: bool, out: str) -> list[dict]:
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if smoke:
        return [
            {
                "name": "kernels",
                "limit": 300,  # the suite runs these tests itself: here, two of them
                "cmd": pytest + ["tests/test_kernels.py", "-k", "cpu and one-segment"],
            },
            {"name": "fp16", "needs_gpu": True},
            {
                "name": "attention",
                "limit": 300,
                "json": "attention.json",
                "cmd": [
                    py,
                    "benchmarks/attention.py",
                    "--smoke",
                    "--json",
                    os.path.join(out, "attention.json"),
                ],
            },
            {
                "name": "throughput-smoke",
                "limit": 300,
                "json": "throughput_smoke.json",
                "cmd": [
                    py,
                    "benchmarks/train_throughput.py",
                    "--smoke",
                    "--variants",
                    "eager",
                    "flash+fused",
                    "sdpa+compile",
                    "--json",
                    os.path.join(out, "throughput_smoke.json"),
                ],
            },
        ]
    out_stages = [
        {"name": "kernels", "limit": 120, "cmd": pytest + ["tests/test_kernels.py", "-k", "cuda"]},
        {"name": "fp16", "limit": 45, "cmd": pytest + ["tests/test_3d.py", "-k", "fp16"]},
        {
            "name": "attention",
            "limit": 60,
            "json": "attention.json",
            "cmd": [
                py,
                "benchmarks/attention.py",
                "--seq",
                "2048",
                "8192",
                "--head-dim",
                "128",
                "--only",
                "attention",
                "--warmup",
                "2",
                "--reps",
                "5",
                "--json",
                os.path.join(out, "attention.json"),
            ],
        },
    ]
    # (preset, limit in seconds, flags): 16 of glm-2b's 36 layers fit the time limit (the output says so)
    for preset, limit, flags in (
        (
            "glm-large",
            100,
            [
                "--seq-length",
                "512",
                "--micro-batch-size",
                "8",
                "--variants",
                "eager",
                "flash",
                "flash+fused",
                "flash+fused+compile",
                "flex+fused",
            ],
        ),
        (
            "glm-2b",
            95,
            [
                "--seq-length",
                "1024",
                "--micro-batch-size",
                "4",
                "--num-layers",
                "16",
                "--variants",
                "eager",
                "flash+fused",
                "flash+fused+compile",
            ],
        ),
    ):
        name = f"throughput_{preset}.json"
        out_stages.append(
            {
                "name": f"throughput-{preset}",
                "limit": limit,
                "json": name,
                "cmd": [
                    py,
                    "benchmarks/train_throughput.py",
                    "--preset",
                    preset,
                    "--steps",
                    "6",
                    "--warmup",
                    "2",
                    *flags,
                    "--json",
                    os.path.join(out, name),
                ],
            }
        )
    return out_stages


def run_stage(stage: dict, log, smoke: bool) -> dict:
    if stage.get("needs_gpu"):
        log.write(f"== {stage['name']}: needs a GPU, not run\n")
        return {"name": stage["name"], "status": "needs a GPU"}
    start = time.time()
    log.write(f"== {stage['name']}: {' '.join(stage['cmd'])}\n")
    log.flush()
    try:
        done = subprocess.run(
            stage["cmd"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=stage["limit"],
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                **({"TRITON_INTERPRET": "1"} if smoke else {}),
            },
        )
        output, status = (
            done.stdout + done.stderr,
            "passed" if done.returncode == 0 else f"failed ({done.returncode})",
        )
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
            errors="replace"
        )
        status = f"timed out after {stage['limit']} s"
    log.write(output[-20000:] + f"\n== {stage['name']}: {status} in {time.time() - start:.0f} s\n")
    log.flush()
    return {
        "name": stage["name"],
        "status": status,
        "seconds": round(time.time() - start, 1),
        "tail": output.strip().splitlines()[-3:],
    }


def summarize(results: list[dict], out: str) -> dict:
    """summary.json: every stage's status, and every figure the benchmarks wrote; summary.md: the tables."""
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "stages": results,
        "attention": [],
        "throughput": [],
    }
    lines = [
        f"GPU check {summary['date']}",
        "",
        "| stage | status | seconds |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r['name']} | {r['status']} | {r.get('seconds', '')} |" for r in results]
    for r in results:
        path = os.path.join(out, r.get("json") or "")
        if not r.get("json") or not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        summary["device"] = data.get("device") or summary.get("device")
        if r["name"] == "attention":
            summary["attention"] = [x for x in data["results"] if x.get("kernel") == "attention"]
        else:
            summary["throughput"] += data["rows"]
    if summary["attention"]:
        lines += [
            "",
            "| attention (fwd+bwd) | seq | head dim | ms | TFLOP/s | peak MiB |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {a['method']} | {a['seq']} | {a['head_dim']} | {a['ms']:.2f} | {a['tflops']:.1f} | "
            f"{a['peak_mib']:.0f} |"
            for a in summary["attention"]
        ]
    if summary["throughput"]:
        lines += [
            "",
            "| model | variant | seq | ms/step | tokens/s | MFU | peak GiB | glm-plan GiB | plan/measured |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]

        # a figure the run did not produce (no GPU peak, no plan for flex) is "-"
        def cell(row, key, fmt):
            return format(row[key], fmt) if row.get(key) is not None else "-"

        for t in summary["throughput"]:
            ratio = (
                format(t["plan_gib"] / t["peak_gib"], ".2f")
                if t.get("plan_gib") and t.get("peak_gib")
                else "-"
            )
            lines.append(
                f"| {t['layers']}L h{t['hidden']} | {t['variant']} | {t['seq']} | {t['step_ms']:.1f} | "
                f"{t['tokens_per_s']:,.0f} | {cell(t, 'mfu', '.1%')} | {cell(t, 'peak_gib', '.2f')} | "
                f"{cell(t, 'plan_gib', '.2f')} | {ratio} |"
            )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--smoke", action="store_true", help="every stage on the CPU with tiny shapes")
    args = p.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; on the CPU run it with --smoke", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    results = []
    with open(os.path.join(args.out, "stages.log"), "a") as log:
        for stage in stages(args.smoke, args.out):
            result = run_stage(stage, log, args.smoke)
            result["json"] = stage.get("json")
            results.append(result)
            print(f"gpu_check: {result['name']}: {result['status']}", flush=True)
            summarize(results, args.out)  # after every stage: a timeout keeps what finished
    failed = [r["name"] for r in results if r["status"] not in ("passed", "needs a GPU")]
    print(
        f"gpu_check: summary in {args.out}/summary.md"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
