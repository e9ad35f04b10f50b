"""glm-eval's host memory per rank: the whole model in one process against each rank's shard (TP, TP x PP).

A checkpoint of a mid-sized GLM is made by one glm-pretrain step (random data from the demo's
corpus), then glm-eval scores the same choice task on it in one process (the baseline: every
rank holds the merged model), on TP 2 and on TP 2 x PP 2. Each rank records its peak RSS
(``ru_maxrss``) after the run; the baseline's peak and the ranks' are printed side by side with
the weights' bytes.

    python benchmarks/eval_shard_memory.py                       # 12 layers, hidden 1024 on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

WRAPPER = """
import json, os, resource, sys
from megatron_glm.evaluate import main
code = main(sys.argv[2:])
with open(os.path.join(sys.argv[1], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump({"code": code, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)
"""


def checkpoint(work: str, args) -> tuple[str, str]:
    from megatron_glm.demo import main as demo

    demo(["--workdir", os.path.join(work, "data"), "--skip-training"])
    data = os.path.join(work, "data")
    save = os.path.join(work, "ckpt")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_glm.training.pretrain",
            "--data-path",
            os.path.join(data, "stdlib_text_document"),
            "--tokenizer-model",
            os.path.join(data, "spm.model"),
            "--num-layers",
            str(args.num_layers),
            "--hidden-size",
            str(args.hidden_size),
            "--num-attention-heads",
            "16",
            "--seq-length",
            "128",
            "--micro-batch-size",
            "1",
            "--train-iters",
            "1",
            "--split",
            "100,0,0",
            "--save",
            save,
            "--data-cache-path",
            os.path.join(work, "cache"),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"glm-pretrain failed:\n{done.stderr[-3000:]}")
    task = os.path.join(work, "mc.jsonl")
    with open(task, "w") as f:
        for k in range(16):
            f.write(
                json.dumps(
                    {
                        "text": f"Return the [MASK] of item {k}.",
                        "choices": ["file", "name"],
                        "label": 0,
                    }
                )
                + "\n"
            )
    return save, task


def run(save: str, task: str, nproc: int, extra: list[str], folder: str) -> list[dict]:
    os.makedirs(folder)
    wrapper = os.path.join(folder, "wrapper.py")
    with open(wrapper, "w") as f:
        f.write(WRAPPER)
    argv = [wrapper, folder, "--load", save, "--task", f"choice:{task}", "--device", "cpu", *extra]
    cmd = [sys.executable, *argv]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"glm-eval {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(nproc)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=1024)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        save, task = checkpoint(work, args)
        from megatron_glm.checkpoint import load_model_weights

        state, _ = load_model_weights(save)
        weights = sum(t.numel() * 4 for t in state.values())
        del state
        rows = []
        for name, nproc, extra in (
            ("one process (baseline)", 1, []),
            ("TP 2", 2, ["--tensor-model-parallel-size", "2"]),
            (
                "TP 2 x PP 2",
                4,
                ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
            ),
        ):
            ranks = run(save, task, nproc, extra, os.path.join(work, name.split()[0] + str(nproc)))
            rows.append((name, max(r["peak_rss"] for r in ranks)))
    base = rows[0][1]
    print(
        f"{args.num_layers} layers, hidden {args.hidden_size}: {weights / 2**20:,.0f} MiB of fp32 weights"
    )
    print("| glm-eval | worst rank's peak RSS | vs one process |")
    print("|---|---|---|")
    for name, peak in rows:
        print(f"| {name} | {peak / 2**20:,.0f} MiB | {peak / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
