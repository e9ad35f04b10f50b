"""Training datasets: packing, splits, blending, the cached sample index, the sampler."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_glm.data import packed_dataset
from megatron_glm.data.blended_dataset import (
    blend_index,
    build_train_valid_test_datasets,
    parse_data_path,
    parse_split,
    split_documents,
)
from megatron_glm.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_glm.data.packed_dataset import PackedDataset
from megatron_glm.data.sampler import PretrainingSampler


@pytest.fixture
def corpus_prefix(tmp_path):
    """300 documents of varied length (some empty), tokens encode (document, position)."""
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "c")
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for d in range(300):
            n = int(rng.integers(0, 90))
            w.add_document(d * 1000 + np.arange(n))
    return prefix


def stream(indexed, doc_idx):
    return np.concatenate([indexed.document(int(d)) for d in doc_idx])


def test_samples_are_the_packed_document_stream(corpus_prefix, tmp_path):
    indexed = IndexedDataset(corpus_prefix)
    ds = PackedDataset(indexed, 20, 280, 64, 1000, seed=7, cache_dir=str(tmp_path / "cache"))
    n_docs = 260
    assert ds.num_epochs > 1
    for e in range(ds.num_epochs):  # each epoch visits every document of the range exactly once
        epoch = np.asarray(ds.doc_idx[e * n_docs : (e + 1) * n_docs])
        assert sorted(epoch.tolist()) == list(range(20, 280))
    text = stream(indexed, ds.doc_idx)
    inverse = np.argsort(ds.shuffle_idx)
    for j in range(len(ds)):  # sample in stream order j lives at shuffled position inverse[j]
        sample = ds[int(inverse[j])]
        assert np.array_equal(sample["text"], text[j * 64 : (j + 1) * 64])
        assert sample["text"].dtype == np.int64 and sample["document_lengths"].sum() == 64
        # document pieces are exactly the runs of one document id (tokens encode their document)
        docs = sample["text"] // 1000
        runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, docs, -1]) != 0))
        assert runs.tolist() == sample["document_lengths"].tolist()
    assert not np.array_equal(ds.shuffle_idx, np.arange(len(ds))), "samples are shuffled"


def test_one_pass_by_default(corpus_prefix, tmp_path):
    indexed = IndexedDataset(corpus_prefix)
    ds = PackedDataset(indexed, 0, 300, 50, None, seed=1, cache_dir=str(tmp_path))
    assert len(ds) == indexed.num_tokens // 50 and ds.num_epochs == 1


def test_index_is_cached_deterministic_and_keyed_by_its_inputs(
    corpus_prefix, tmp_path, monkeypatch
):
    indexed = IndexedDataset(corpus_prefix)
    cache = str(tmp_path / "cache")
    a = PackedDataset(indexed, 0, 300, 32, 500, seed=3, cache_dir=cache)
    files = sorted(os.listdir(cache))

    def refuse(*args, **kw):
        raise AssertionError("the cached index must be reused")

    monkeypatch.setattr(packed_dataset, "build_sample_index", refuse)
    b = PackedDataset(IndexedDataset(corpus_prefix), 0, 300, 32, 500, seed=3, cache_dir=cache)
    assert sorted(os.listdir(cache)) == files
    assert isinstance(b.sample_idx, np.memmap), "other ranks memory-map the cache"
    for i in (0, 17, 499):
        assert np.array_equal(a[i]["text"], b[i]["text"])
    monkeypatch.undo()
    for change in (dict(seed=4), dict(sample_length=33), dict(num_samples=501)):
        kw = dict(seed=3, sample_length=32, num_samples=500) | change
        c = PackedDataset(
            indexed, 0, 300, kw["sample_length"], kw["num_samples"], kw["seed"], cache
        )
        assert len(os.listdir(cache)) > len(files), f"{change} must get its own cache entry"
        files = sorted(os.listdir(cache))
    assert not np.array_equal(c.shuffle_idx[:50], a.shuffle_idx[:50])


def test_a_rebuilt_corpus_never_reuses_a_stale_index(corpus_prefix, tmp_path):
    cache = str(tmp_path / "cache")
    PackedDataset(IndexedDataset(corpus_prefix), 0, 300, 32, 100, seed=3, cache_dir=cache)
    with IndexedDatasetWriter(corpus_prefix, np.int32, overwrite=True) as w:
        for d in range(300):
            w.add_document(np.arange(d % 7 + 5))
    ds = PackedDataset(IndexedDataset(corpus_prefix), 0, 300, 32, 100, seed=3, cache_dir=cache)
    assert ds[0]["text"].max() < 12


def test_split_too_small_is_a_clear_error(corpus_prefix, tmp_path):
    with pytest.raises(ValueError, match="less than one sample of 4096"):
        PackedDataset(
            IndexedDataset(corpus_prefix), 0, 3, 4096, 10, seed=1, cache_dir=str(tmp_path)
        )


def test_parsers():
    assert parse_data_path(["A"]) == [(1.0, "A")]
    assert parse_data_path(["A", "B"]) == [(0.5, "A"), (0.5, "B")]
    for spec in (["0.7", "A", "0.3", "B"], ["7", "A", "3", "B"]):
        (wa, a), (wb, b) = parse_data_path(spec)
        assert (a, b) == ("A", "B") and (wa, wb) == pytest.approx((0.7, 0.3))
    for bad in (
        ["0.7", "A", "B"],
        ["A", "0.3"],
        ["0.5", "A", "x", "B"],
        [],
        ["0", "A"],
        ["nan", "A", "0.5", "B"],
        ["inf", "A", "0.5", "B"],
    ):
        with pytest.raises(ValueError, match="--data-path"):
            parse_data_path(bad)
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert parse_split("98/2") == pytest.approx([0.98, 0.02, 0.0])
    for bad in ("a,b", "0,0,0", "1,2,3,4", "-1,2", "nan,1,0", "inf,1,0"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


@given(
    n=st.integers(0, 10_000),
    parts=st.lists(st.integers(0, 1000), min_size=3, max_size=3).filter(any),
)
def test_split_documents_partitions_the_corpus(n, parts):
    fractions = [p / sum(parts) for p in parts]
    ranges = split_documents(n, fractions)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for (lo, hi), f in zip(ranges, fractions):
        assert abs((hi - lo) - f * n) <= 2


@settings(max_examples=50, deadline=None)
@given(weights=st.lists(st.floats(0.01, 10), min_size=1, max_size=5), n=st.integers(1, 3000))
def test_blending_keeps_every_prefix_near_the_weights(weights, n):
    w = np.asarray(weights) / sum(weights)
    idx = blend_index(list(w), n)
    onehot = np.eye(len(w))[idx["dataset"]]
    counts = np.cumsum(onehot, axis=0)
    ideal = np.outer(np.arange(1, n + 1), w)
    # dataset d's count by the time T of sample n is within 0.5 of T*w_d, and |n - T| <= k/2
    assert (np.abs(counts - ideal) <= 0.5 + w * len(w) / 2 + 1e-9).all()
    for d in range(len(w)):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert idx["sample"][idx["dataset"] == d].tolist() == list(range(int(counts[-1, d])))


def test_train_valid_test_over_weighted_corpora(corpus_prefix, tmp_path):
    other = str(tmp_path / "other")
    with IndexedDatasetWriter(other, np.int32) as w:
        for _ in range(50):
            w.add_document(-np.arange(1, 40))  # negative tokens: recognisably the second corpus
    train, valid, test = build_train_valid_test_datasets(
        ["0.75", corpus_prefix, "0.25", other], "90,10,0", 16, [400, 40, 40], seed=5
    )
    assert test is None and len(train) == 400 and len(valid) == 40
    from_other = sum(int(train[i]["text"][0] < 0) for i in range(400))
    assert from_other == 100 and sum(train[i]["dataset"] == 1 for i in range(400)) == 100
    # the valid split never sees a training document
    train_docs = {
        int(t) // 1000 for i in range(400) if train[i]["dataset"] == 0 for t in train[i]["text"]
    }
    valid_docs = {
        int(t) // 1000 for i in range(40) if valid[i]["dataset"] == 0 for t in valid[i]["text"]
    }
    assert not train_docs & valid_docs
    again = build_train_valid_test_datasets(
        ["0.75", corpus_prefix, "0.25", other], "90,10,0", 16, [400, 40, 40], seed=5
    )[0]
    assert all(np.array_equal(train[i]["text"], again[i]["text"]) for i in range(0, 400, 37))


def test_tokenizer_and_data_must_agree(tmp_path, corpus, spm_model, tokenizer):
    from megatron_glm.data.tokenizer import load_tokenizer
    from megatron_glm.data_prep.preprocess import preprocess

    preprocess([corpus[0]], str(tmp_path / "p"), tokenizer.spec)
    prefix = str(tmp_path / "p_text_document")
    assert (
        build_train_valid_test_datasets([prefix], "1", 32, [10, 0, 0], tokenizer=tokenizer)[0]
        is not None
    )
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "word"]) + "\n")
    with pytest.raises(ValueError, match="was tokenized with sentencepiece"):
        build_train_valid_test_datasets(
            [prefix], "1", 32, [10, 0, 0], tokenizer=load_tokenizer(vocab_file=str(vocab))
        )
    with pytest.raises(FileNotFoundError, match="glm-preprocess"):
        build_train_valid_test_datasets([str(tmp_path / "missing")], "1", 32, [10, 0, 0])


def test_sampler_is_independent_of_data_parallel_size():
    def global_order(dp, consumed=0, total=96, micro=2):
        steps = [list(PretrainingSampler(total, consumed, micro, r, dp)) for r in range(dp)]
        return [i for step in zip(*steps) for batch in step for i in batch]

    assert global_order(1) == global_order(2) == global_order(4) == list(range(96))
    # resume at sample 24 after training on DP=2, continue on DP=4: the same remaining samples
    assert global_order(4, consumed=24) == list(range(24, 96))
    assert len(PretrainingSampler(100, 0, 4, 0, 2)) == 12  # the incomplete last step is dropped
    with pytest.raises(ValueError):
        PretrainingSampler(10, 0, 1, 2, 2)
