"""Blank-infilling collator throughput: samples/s of ``collator(batch)`` on one core, per objective.

The baseline is the collator as it was at a given git revision (default 8557915, before the
whole-batch layout), loaded with ``git show`` and timed in the same run, on the same batches,
alternating with today's code. The anchor is THUDM/GLM's ``ConstructBlockStrategy``, measured
2026-12-01 on one quiet core of this machine class with the same shapes (batches of 16 x 512
random ids, 5% sentence-end ids, GLM-large settings): token 871, sentence 1,047, document
2,221 samples/s. Its figures are quoted, not re-measured: the reference needs its own
``mpu`` and tokenizer to run.

The "vs THUDM" column chains the same-run ratio to 8557915 with 8557915's measured ratio to
THUDM (2.65x / 2.96x / 2.18x), so it does not depend on how fast the machine is at the moment;
it is printed only against the 8557915 baseline. It also says, per mode, whether today's
batches are bitwise those of the baseline (same seed and sample index): the objective fixes of
this version change some of them on purpose.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import types

import numpy as np

from megatron_glm.data import blank_infilling as today

THUDM = {"token": 871, "sentence": 1047, "document": 2221}
# 8557915's own speed over THUDM's in that side-by-side run: today / THUDM = (today / 8557915, timed here) x this,
# which does not depend on how fast the machine happens to be at the moment of this run
ANCHOR_REVISION, ANCHOR_RATIO = "8557915", {"token": 2.65, "sentence": 2.96, "document": 2.18}
MODES = {
    "token": dict(),
    "sentence": dict(token_prob=0.0, sentence_prob=1.0),
    "document": dict(token_prob=0.0, sentence_prob=0.0),
    "token, packed 4 docs": dict(packed=True),
}


def load_revision(rev: str) -> types.ModuleType:
    """The collator module as it was at ``rev`` (a git revision of this repository)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(
        ["git", "show", f"{rev}:megatron_glm/data/blank_infilling.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType(f"blank_infilling_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(src, f"{rev}:megatron_glm/data/blank_infilling.py", "exec"), module.__dict__)
    return module


def collator(module, S: int, kw: dict):
    sp = module.SpecialIds(pad=0, mask=1, smask=2, gmask=3, sop=4, eop=5)
    return module.BlankInfillingCollator(
        module.BlankInfillingConfig(seq_length=S, **kw), sp, np.array([6])
    )


def rates(collates, batches, repeats: int) -> list[float]:
    """Samples/s of each collator: the best of ``repeats`` passes over ``batches``, the collators taking turns pass by
    pass so that a noisy moment of the machine hits them alike (the best pass is the least disturbed one)."""
    best = [float("inf")] * len(collates)
    for _ in range(repeats):
        for k, collate in enumerate(collates):
            start = time.perf_counter()
            for batch in batches:
                collate(batch)
            best[k] = min(best[k], time.perf_counter() - start)
    return [sum(len(b) for b in batches) / t for t in best]


def main():
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=40, help="batches per pass")
    p.add_argument(
        "--repeats", type=int, default=10, help="passes per figure, taking turns (the best counts)"
    )
    p.add_argument("--baseline", default="8557915", help="git revision of the baseline collator")
    args = p.parse_args()
    try:
        import torch

        torch.set_num_threads(1)  # one core, as the anchor was measured
    except ImportError:  # pragma: no cover
        pass
    S, bs = args.seq_length, args.batch_size
    rng = np.random.default_rng(0)
    texts = [rng.integers(10, 30000, S) for _ in range(64)]
    for t in texts:
        t[rng.choice(S, S // 20, replace=False)] = 6  # sentence ends
    old = load_revision(args.baseline)
    print(
        f"{datetime.date.today()}, {platform.machine()} {platform.processor() or ''}, one core; "
        f"batches of {bs} x {S}; baseline: the collator at {args.baseline}"
    )
    print(
        "anchor, THUDM samples/s (issue 17, quoted): "
        + ", ".join(f"{k} {v:,}" for k, v in THUDM.items())
    )
    print(
        f"{'mode':>22} | {args.baseline:>8} | {'today':>8} | today/baseline | vs THUDM, chained | bitwise"
    )
    for name, kw in MODES.items():
        docs = np.array([S // 4] * 4) if "packed" in name else None
        batches = [
            [
                (b * bs + j, {"text": texts[(b * bs + j) % 64], "document_lengths": docs})
                for j in range(bs)
            ]
            for b in range(args.batches)
        ]
        new_c, old_c = collator(today, S, kw), collator(old, S, kw)
        new_c(batches[0]), old_c(batches[0])  # warm up (imports torch)
        same = all(
            all(
                np.array_equal(x.numpy(), y.numpy())
                for x, y in zip(new_c(b).values(), old_c(b).values())
            )
            for b in batches[:5]
        )
        o, n = rates([old_c, new_c], batches, args.repeats)
        anchor = ANCHOR_RATIO.get(name) if args.baseline == ANCHOR_REVISION else None
        chained = f"{n / o * anchor:.1f}x" if anchor else ""
        print(
            f"{name:>22} | {o:8,.0f} | {n:8,.0f} | {n / o:13.2f}x | {chained:>17} | {'yes' if same else 'no'}"
        )


if __name__ == "__main__":
    main()
