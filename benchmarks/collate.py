"""Blank-infilling collator throughput: samples/s on one core, per objective, at seq 512.

Prints our figure beside the issue's goal (5,000 samples/s per core in token mode) and
beside a plain per-token Python loop doing the same Part A / Part B layout (the obvious
unvectorised implementation), measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from megatron_glm.data.blank_infilling import BlankInfillingCollator, BlankInfillingConfig, SpecialIds

SP = SpecialIds(pad=0, mask=1, smask=2, gmask=3, sop=4, eop=5)


def naive_layout(text, spans, S):
    """Per-token Python loops: the layout without numpy (the baseline)."""
    tokens, labels, pos0, pos1 = [], [], [], []
    starts = {s: n for s, n in spans}
    i = 0
    mask_pos = {}
    while i < len(text):
        if i in starts:
            mask_pos[i] = len(tokens)
            tokens.append(SP.mask)
            i += starts[i]
        else:
            tokens.append(int(text[i]))
            i += 1
    pos0 = list(range(len(tokens)))
    pos1 = [0] * len(tokens)
    labels = [0] * len(tokens)
    for s, n in spans:
        for j in range(n + 1):
            tokens.append(SP.sop if j == 0 else int(text[s + j - 1]))
            labels.append(int(text[s + j]) if j < n else SP.eop)
            pos0.append(mask_pos[s])
            pos1.append(j + 1)
    pad = S - len(tokens)
    return tokens + [0] * pad, labels + [0] * pad, pos0 + [0] * pad, pos1 + [0] * pad


def rate(fn, n):
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--samples", type=int, default=5000)
    args = p.parse_args()
    S, n = args.seq_length, args.samples
    rng = np.random.default_rng(0)
    texts = [rng.integers(10, 30000, S) for _ in range(64)]
    for t in texts:
        t[rng.choice(S, S // 20, replace=False)] = 6  # sentence ends
    print(f"device: {platform.machine()}, one core; seq {S}; {n} samples per figure")
    results = {}
    for name, cfg in {
        "token": BlankInfillingConfig(seq_length=S),
        "sentence": BlankInfillingConfig(seq_length=S, token_prob=0.0, sentence_prob=1.0),
        "document": BlankInfillingConfig(seq_length=S, token_prob=0.0, sentence_prob=0.0),
        "token, packed 4 docs": BlankInfillingConfig(seq_length=S, packed=True),
    }.items():
        collate = BlankInfillingCollator(cfg, SP, np.array([6]))
        docs = np.array([S // 4] * 4) if "packed" in name else None
        results[name] = rate(lambda i: collate.encode(i, texts[i % 64], docs), n)
        print(f"{name:>22}: {results[name]:8,.0f} samples/s")
    collate = BlankInfillingCollator(BlankInfillingConfig(seq_length=S), SP)

    def baseline(i):  # the same span draw, then the layout with per-token Python loops
        spans, length = collate._token_spans(np.random.default_rng([1234, i]), S, np.array([S]))
        return naive_layout(texts[i % 64][:length], sorted(spans), S)

    base = rate(baseline, n)
    print(f"{'baseline':>22}: {base:8,.0f} samples/s (same span draw, per-token Python layout)")
    print(f"ratio token/goal 5,000: {results['token'] / 5000:.2f}; token/baseline: {results['token'] / base:.2f}")


if __name__ == "__main__":
    main()
