"""What refusing non-finite weights costs a reader, beside the read itself.

Writes a state dict of ``--gib`` GiB in ``--dtype`` (4096 x 4096 tensors) with torch.save,
then times, interleaved and best of ``--repeats``: ``torch.load`` of it (from the page cache,
the fastest a read can be, so the ratio is an upper bound), ``serialization.check_finite`` on
the loaded tensors, and the elementwise test it replaced (``torch.isfinite(t).all()`` per
tensor). Prints seconds and each check's ratio to the read.

    python benchmarks/finite_check.py --gib 1 --dtype fp32
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from megatron_glm.serialization import check_finite

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    per = 4096 * 4096 * torch.tensor([], dtype=dtype).element_size()
    state = {
        f"w{i}": torch.randn(4096, 4096).to(dtype)
        for i in range(max(1, int(args.gib * 2**30 / per)))
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        torch.save(state, path)
        del state
        best = {
            "read": float("inf"),
            "check_finite": float("inf"),
            "isfinite().all()": float("inf"),
        }
        for _ in range(args.repeats):
            started = time.perf_counter()
            loaded = torch.load(path, weights_only=True)
            best["read"] = min(best["read"], time.perf_counter() - started)
            started = time.perf_counter()
            check_finite(loaded.items(), path)
            best["check_finite"] = min(best["check_finite"], time.perf_counter() - started)
            started = time.perf_counter()
            assert all(bool(torch.isfinite(t).all()) for t in loaded.values())
            best["isfinite().all()"] = min(best["isfinite().all()"], time.perf_counter() - started)
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {len(loaded)} x 4096 x 4096 {args.dtype} ({os.cpu_count()} CPUs)"
    )
    for name, seconds in best.items():
        print(f"  {name:18s} {seconds:7.3f} s   {seconds / best['read']:5.2f}x the read")


if __name__ == "__main__":
    main()
