"""Training data over several corpora: Megatron's ``--data-path`` weights and ``--split``.

``--data-path 0.7 A 0.3 B`` draws 70% of the samples from A and 30% from B, interleaved so
that every prefix of the sample sequence keeps those proportions (see ``blend_index``);
``--split 949,50,1`` cuts each corpus's documents into train/valid/test ranges. Everything
is deterministic from (seed, data, sample length, split, sample counts), cached, and any
sample is fetched by its index alone.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from megatron_glm.data.dataset_meta import check_tokenizer_matches
from megatron_glm.data.index_cache import load_or_build
from megatron_glm.data.indexed import IndexedDataset
from megatron_glm.data.packed_dataset import PackedDataset

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path: Sequence[str]) -> list[tuple[float, str]]:
    """``["A"]``, ``["A", "B"]`` (equal weights) or ``["0.7", "A", "0.3", "B"]`` -> [(weight, prefix)]."""
    items = list(data_path)
    if not items:
        raise ValueError("--data-path is empty: give a dataset prefix, or weight/prefix pairs")

    def number(s):
        try:
            return float(s)
        except ValueError:
            return None

    if number(items[0]) is None:
        if any(number(x) is not None for x in items):
            raise ValueError(
                f"--data-path {' '.join(items)}: mixes weights and bare prefixes; "
                "give either prefixes only or weight/prefix pairs (0.7 A 0.3 B)"
            )
        pairs = [(1.0, p) for p in items]
    else:
        if (
            len(items) % 2
            or any(number(w) is None for w in items[0::2])
            or any(number(p) is not None for p in items[1::2])
        ):
            raise ValueError(
                f"--data-path {' '.join(items)}: expected weight/prefix pairs such as 0.7 A 0.3 B"
            )
        pairs = [(float(w), p) for w, p in zip(items[0::2], items[1::2])]
    if not all(math.isfinite(w) and w >= 0 for w, _ in pairs) or sum(w for w, _ in pairs) <= 0:
        raise ValueError(
            f"--data-path weights must be finite, non-negative and not all zero, got "
            f"{[w for w, _ in pairs]}"
        )
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` (or with ``/``) -> normalised train/valid/test fractions."""
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--split {split!r}: expected up to three comma-separated numbers such as 949,50,1"
        ) from None
    if (
        not 1 <= len(parts) <= 3
        or not all(math.isfinite(x) and x >= 0 for x in parts)
        or sum(parts) <= 0
    ):
        raise ValueError(
            f"--split {split!r}: expected one to three finite non-negative numbers, not all zero"
        )
    parts += [0.0] * (3 - len(parts))
    return [x / sum(parts) for x in parts]


def split_documents(num_documents: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Consecutive document ranges in the given proportions (Megatron's rounding)."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_documents)))
    shift = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - shift for b in bounds[1:]]
    bounds = [min(max(b, 0), num_documents) for b in bounds]
    return list(zip(bounds[:-1], bounds[1:]))


def blend_index(weights: Sequence[float], num_samples: int) -> dict[str, np.ndarray]:
    """Which corpus and which of its samples each blended sample is.

    Corpus ``d``'s ``k``-th sample is placed at time ``(k + 0.5) / w_d`` and the samples are
    merged by time: vectorised (Megatron's greedy needs a C++ loop), and every prefix of ``n``
    samples holds ``n * w_d`` of corpus ``d`` to within ``0.5 + w_d * k / 2`` for ``k`` corpora.
    """
    times, owners = [], []
    for d, w in enumerate(weights):
        if w <= 0:
            continue
        count = int(np.ceil(w * num_samples)) + 1
        times.append((np.arange(count) + 0.5) / w)
        owners.append(np.full(count, d, dtype=np.int16))
    times, owners = np.concatenate(times), np.concatenate(owners)
    order = np.argsort(times, kind="stable")[:num_samples]
    dataset_index = owners[order]
    dataset_sample = np.empty(num_samples, dtype=np.int64)
    for d in range(len(weights)):
        where = dataset_index == d
        dataset_sample[where] = np.arange(int(where.sum()))
    return {"dataset": dataset_index, "sample": dataset_sample}


class BlendedDataset:
    """Samples drawn from several datasets in fixed proportions."""

    def __init__(self, datasets, weights, num_samples: int, cache_dir: str, description: dict):
        self.datasets, self.weights = datasets, list(weights)
        index = load_or_build(
            cache_dir,
            "blend",
            {**description, "weights": self.weights, "num_samples": num_samples},
            lambda: blend_index(self.weights, num_samples),
        )
        self.dataset_index, self.dataset_sample = index["dataset"], index["sample"]

    def __len__(self) -> int:
        return self.dataset_index.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} blended samples")
        d = int(self.dataset_index[i])
        sample = self.datasets[d][int(self.dataset_sample[i])]
        sample["dataset"] = d
        return sample


def build_train_valid_test_datasets(
    data_path: Sequence[str],
    split: str,
    sample_length: int,
    num_samples: Sequence[int | None],
    seed: int = 1234,
    cache_dir: str | None = None,
    tokenizer=None,
) -> list:
    """``[train, valid, test]`` datasets (``None`` where a split is empty or no samples are asked).

    ``num_samples[k] = None`` means one pass over that split's documents.
    """
    pairs = parse_data_path(data_path)
    fractions = parse_split(split)
    cache_dir = cache_dir or os.path.join(
        os.path.dirname(os.path.abspath(pairs[0][1])), "index-cache"
    )
    corpora = []
    for _, prefix in pairs:
        indexed = IndexedDataset(prefix)
        if tokenizer is not None:
            check_tokenizer_matches(prefix, indexed, tokenizer, cache_dir)
        corpora.append(indexed)
    weights = [w for w, _ in pairs]
    out = []
    for k, name in enumerate(SPLIT_NAMES):
        wanted = num_samples[k]
        if fractions[k] == 0 or wanted == 0:
            out.append(None)
            continue
        ranges = [split_documents(c.num_documents, fractions)[k] for c in corpora]
        if wanted is None:  # one pass over the split's tokens
            wanted = sum(
                int(c.document_lengths()[b:e].sum()) // sample_length
                for c, (b, e) in zip(corpora, ranges)
            )
            if wanted == 0:
                raise ValueError(
                    f"the {name} split ({fractions[k]:.1%} of the documents) holds less than one "
                    f"sample of {sample_length} tokens: change --split, or add data"
                )
        counts = np.bincount(blend_index(weights, wanted)["dataset"], minlength=len(pairs))
        parts = [
            PackedDataset(c, b, e, sample_length, int(n), seed, cache_dir, name) if n else None
            for c, (b, e), n in zip(corpora, ranges, counts)
        ]
        if len(parts) == 1:
            out.append(parts[0])
            continue
        description = {
            "data": [c.fingerprint() for c in corpora],
            "split": name,
            "seed": seed,
            "sample_length": sample_length,
        }
        out.append(BlendedDataset(parts, weights, wanted, cache_dir, description))
    return out
