"""What checking the whole index costs when a dataset is opened, and the token-id pass.

Writes a synthetic dataset of ``--sequences`` one-sequence documents, then times, in the
same process and interleaved: opening it with today's reader (the full index check), opening
it with the reader of ``--baseline-rev`` (header and size checks only, loaded from git), and
``token_range()`` (the pass over the .bin that training runs once per dataset). Prints ms per
million sequences and the ratio.

    python benchmarks/index_check.py --sequences 5000000
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_reader(rev: str):
    """``IndexedDataset`` as it was at ``rev`` (its module source from git, run in a module of its own)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:megatron_glm/data/indexed.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"indexed_{rev}")
    # dataclass-free, but annotations resolve through sys.modules
    sys.modules[module.__name__] = module
    exec(compile(source, f"{rev}:indexed.py", "exec"), module.__dict__)
    return module.IndexedDataset


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sequences", type=int, default=5_000_000)
    p.add_argument(
        "--mean-length", type=int, default=200, help="tokens per document (exponential lengths)"
    )
    p.add_argument(
        "--baseline-rev", default="8557915", help="the commit whose reader is the baseline"
    )
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    from megatron_glm.data.indexed import IndexedDataset, IndexedDatasetWriter

    old_reader = load_reader(args.baseline_rev)
    rng = np.random.default_rng(0)
    lengths = np.maximum(rng.exponential(args.mean_length, args.sequences).astype(np.int64), 1)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "bench")
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            for start in range(0, lengths.size, 1 << 20):
                part = lengths[start : start + (1 << 20)]
                w.add_documents(rng.integers(0, 50000, int(part.sum()), dtype=np.uint16), part)
        new = best_of(lambda: IndexedDataset(prefix), args.repeats)
        old = best_of(lambda: old_reader(prefix), args.repeats)
        ds = IndexedDataset(prefix)
        scan = best_of(lambda: (setattr(ds, "_token_range", None), ds.token_range()), args.repeats)
        gb = os.path.getsize(prefix + ".bin") / 1e9
    per_m = 1e6 / args.sequences * 1e3
    print(
        f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}; "
        f"{args.sequences:,} sequences, {gb:.2f} GB of uint16 tokens; best of {args.repeats}"
    )
    print(f"open, full index check (ours):        {new * per_m:8.1f} ms per million sequences")
    print(
        f"open, header checks ({args.baseline_rev}, baseline): {old * per_m:8.1f} ms per million sequences"
    )
    print(
        f"the check's cost:                     {(new - old) * per_m:8.1f} ms per million sequences "
        f"({new / old:.1f}x the baseline open)"
    )
    print(f"token_range() over the .bin:          {scan:8.3f} s, {gb / scan:.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
