"""The .bin/.idx format: round trips, byte compatibility with megatron-core, merge, bad files."""

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_glm.data import indexed as ix
from megatron_glm.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    check_dtype_holds_vocab,
    merge_datasets,
)

DTYPES = [np.uint8, np.int16, np.uint16, np.int32, np.int64]

# a document is a list of sequences, a sequence a list of token ids (small enough for every dtype)
documents = st.lists(
    st.lists(st.lists(st.integers(0, 120), max_size=20), min_size=1, max_size=3), max_size=25
)


def write(prefix, docs, dtype, style):
    with IndexedDatasetWriter(prefix, dtype, overwrite=True) as w:
        for doc in docs:
            if style == "items":
                for seq in doc:
                    w.add_item(seq)
                w.end_document()
            else:
                flat = [t for seq in doc for t in seq]
                w.add_document(flat, [len(seq) for seq in doc])


def expected_idx_size(docs):
    n_seq = sum(len(d) for d in docs)
    return 34 + 12 * n_seq + 8 * (len(docs) + 1)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(docs=documents, dtype=st.sampled_from(DTYPES), style=st.sampled_from(["items", "document"]))
def test_round_trip(tmp_path, docs, dtype, style):
    prefix = str(tmp_path / "rt")
    write(prefix, docs, dtype, style)
    ds = IndexedDataset(prefix)  # opening checks the whole index
    assert ds.dtype == np.dtype(dtype)
    assert ds.num_documents == len(docs)
    assert len(ds) == sum(len(d) for d in docs)
    assert os.path.getsize(prefix + ".idx") == expected_idx_size(docs)
    assert (
        os.path.getsize(prefix + ".bin")
        == sum(len(s) for d in docs for s in d) * np.dtype(dtype).itemsize
    )
    seqs = [s for d in docs for s in d]
    for i, seq in enumerate(seqs):
        assert ds[i].tolist() == seq
    for d, doc in enumerate(docs):
        assert ds.document(d).tolist() == [t for s in doc for t in s]
    assert ds.document_lengths().tolist() == [sum(map(len, d)) for d in docs]


def test_header_layout_matches_reference(tmp_path):
    """The header bytes, field by field, as REFERENCE.md section 4 lays them out."""
    prefix = str(tmp_path / "h")
    write(prefix, [[[1, 2, 3]], [[4], [5, 6]]], np.uint16, "document")
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17])[0] == 1
    assert raw[17] == 8  # uint16
    assert struct.unpack("<QQ", raw[18:34]) == (3, 3)
    assert np.frombuffer(raw[34:46], np.int32).tolist() == [3, 1, 2]
    assert np.frombuffer(raw[46:70], np.int64).tolist() == [0, 6, 8]  # byte offsets
    assert np.frombuffer(raw[70:94], np.int64).tolist() == [0, 1, 3]


def test_spilled_index_is_identical(tmp_path, monkeypatch):
    """Lengths and boundaries that spill to temporary files give the same bytes as in-memory ones."""
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 1000, rng.integers(0, 30)).tolist()] for _ in range(500)]
    write(str(tmp_path / "mem"), docs, np.uint16, "document")
    monkeypatch.setattr(ix, "_CHUNK", 7)
    write(str(tmp_path / "spill"), docs, np.uint16, "items")
    for ext in (".bin", ".idx"):
        assert (
            open(tmp_path / f"mem{ext}", "rb").read() == open(tmp_path / f"spill{ext}", "rb").read()
        )
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_megatron_core_compatibility(tmp_path):
    """megatron-core reads ours; ours reads theirs; their builder writes exactly our bytes; merges agree."""
    torch = pytest.importorskip("torch")
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    rng = np.random.default_rng(1)
    docs = [
        [rng.integers(0, 60000, rng.integers(1, 50)).tolist() for _ in range(rng.integers(1, 3))]
        for _ in range(200)
    ]
    ours = str(tmp_path / "ours")
    write(ours, docs, np.uint16, "items")

    theirs_view = mc.IndexedDataset(ours)
    seqs = [s for d in docs for s in d]
    assert len(theirs_view) == len(seqs)
    assert all(theirs_view[i].tolist() == s for i, s in enumerate(seqs))
    assert theirs_view.document_indices.tolist() == IndexedDataset(ours).document_indices.tolist()

    theirs = str(tmp_path / "theirs")
    builder = mc.IndexedDatasetBuilder(theirs + ".bin", dtype=np.uint16)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.tensor(seq, dtype=torch.int64))
        builder.end_document()
    builder.finalize(theirs + ".idx")
    ds = IndexedDataset(theirs)
    assert all(ds[i].tolist() == s for i, s in enumerate(seqs))
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(theirs + ext, "rb").read()

    merged = merge_datasets([ours, theirs], str(tmp_path / "merged"))
    builder = mc.IndexedDatasetBuilder(str(tmp_path / "their_merge.bin"), dtype=np.uint16)
    builder.add_index(ours)
    builder.add_index(theirs)
    builder.finalize(str(tmp_path / "their_merge.idx"))
    for ext in (".bin", ".idx"):
        assert (
            open(merged.prefix + ext, "rb").read()
            == open(str(tmp_path / "their_merge") + ext, "rb").read()
        )
    assert merged.num_documents == 2 * len(docs)
    assert merged.document(len(docs) + 3).tolist() == [t for s in docs[3] for t in s]


def test_merge_refuses_mixed_dtypes(tmp_path):
    write(str(tmp_path / "a"), [[[1, 2]]], np.uint16, "items")
    write(str(tmp_path / "b"), [[[1, 2]]], np.int32, "items")
    with pytest.raises(IndexedDatasetError, match="dtype int32 differs"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m.idx") and not [
        p for p in os.listdir(tmp_path) if ".tmp" in p
    ]


@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    write(prefix, [[[1, 2, 3], [4]], [[5, 6]]], np.uint16, "items")
    return prefix


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: patch(p + ".idx", 0, b"NOTMEGA"), "not a Megatron indexed dataset"),
        (lambda p: patch(p + ".idx", 9, struct.pack("<Q", 2)), "version 2 is not supported"),
        (lambda p: patch(p + ".idx", 17, b"\x09"), "unknown dtype code 9"),
        (lambda p: truncate(p + ".idx", 20), "shorter than the 34-byte header"),
        (
            lambda p: truncate(p + ".idx", os.path.getsize(p + ".idx") - 8),
            "header promises 3 sequences",
        ),
        (lambda p: patch(p + ".idx", 18, struct.pack("<Q", 2**60)), "corrupt or truncated"),
        (lambda p: truncate(p + ".bin", 6), "describes 12 bytes"),
        (lambda p: open(p + ".bin", "ab").write(b"\0\0"), "describes 12 bytes"),
        (
            lambda p: patch(p + ".idx", os.path.getsize(p + ".idx") - 8, struct.pack("<q", 2)),
            "document index",
        ),
    ],
    ids=[
        "magic",
        "version",
        "dtype",
        "short-header",
        "truncated-idx",
        "huge-count",
        "truncated-bin",
        "trailing-bin",
        "doc-index",
    ],
)
def test_bad_files_get_clear_errors(good, damage, message):
    damage(good)
    with pytest.raises(IndexedDatasetError, match=message) as err:
        IndexedDataset(good)
    assert os.path.basename(good) in str(err.value)


LENGTHS, POINTERS = 34, 34 + 3 * 4  # offsets of the 3 sequence lengths and pointers in good.idx


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: patch(p + ".idx", LENGTHS + 4, struct.pack("<i", 2**31 - 1)),
            "sequence 2 starts at byte 8",
        ),
        (
            lambda p: patch(p + ".idx", LENGTHS + 4, struct.pack("<i", -5)),
            "sequence 1 has a negative length",
        ),
        (
            lambda p: patch(p + ".idx", POINTERS + 8, struct.pack("<q", 2)),
            "sequence 1 starts at byte 2",
        ),
        (lambda p: patch(p + ".idx", 17, b"\x07"), "not an integer type"),
        (
            lambda p: patch(p + ".idx", POINTERS + 3 * 8 + 8, struct.pack("<q", 4)),
            "decreases at document 1",
        ),
    ],
    ids=["huge-length", "negative-length", "pointer", "float-dtype", "doc-order"],
)
def test_the_whole_index_is_checked_on_opening(good, damage, message):
    """Damage that keeps every size consistent: caught by the full check, not later as short samples."""
    sizes = os.path.getsize(good + ".idx"), os.path.getsize(good + ".bin")
    damage(good)
    assert (os.path.getsize(good + ".idx"), os.path.getsize(good + ".bin")) == sizes
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(good)


def test_a_writer_never_renames_a_bad_pair_into_place(good, monkeypatch):
    before = open(good + ".bin", "rb").read(), open(good + ".idx", "rb").read()
    w = IndexedDatasetWriter(good, np.uint16, overwrite=True)
    w.add_document([1, 2, 3])
    w.num_sequences += 1  # a writer bug: the header promises a sequence that is not there
    with pytest.raises(IndexedDatasetError):
        w.finalize()
    assert (open(good + ".bin", "rb").read(), open(good + ".idx", "rb").read()) == before
    assert not [p for p in os.listdir(os.path.dirname(good)) if ".tmp" in p]


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    """SIGKILL leaves *.tmp-PID files; the next writer of that prefix removes those of dead PIDs only."""
    import subprocess
    import sys

    prefix = str(tmp_path / "d")
    code = (
        "import os, numpy as np; from megatron_glm.data.indexed import IndexedDatasetWriter as W; "
        f"w = W({prefix!r}, np.uint16); w.add_document(list(range(10))); w._bin.flush(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    left = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert left, "the dead writer left its temporary .bin"
    alive = tmp_path / f"d.bin.tmp-{os.getppid()}"  # a writer that is still running (our parent)
    alive.write_bytes(b"\0")
    other = tmp_path / "other.bin.tmp-999999999"  # another dataset's: not ours to touch
    other.write_bytes(b"\0")
    write(prefix, [[[1, 2]]], np.uint16, "items")
    assert sorted(os.listdir(tmp_path)) == sorted(["d.bin", "d.idx", alive.name, other.name])


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file_names_the_tool(good, missing):
    os.remove(good + missing)
    with pytest.raises(FileNotFoundError, match="glm-preprocess") as err:
        IndexedDataset(good)
    assert missing in str(err.value)


def test_out_of_range_access_is_an_index_error(good):
    ds = IndexedDataset(good)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.document(2)
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)


def test_writer_never_overwrites_silently(good):
    before = open(good + ".bin", "rb").read(), open(good + ".idx", "rb").read()
    with pytest.raises(FileExistsError, match="--overwrite"):
        IndexedDatasetWriter(good, np.uint16)
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(good, np.uint16, overwrite=True) as w:
            w.add_document([9, 9, 9])
            raise RuntimeError("failure half-way")
    assert (open(good + ".bin", "rb").read(), open(good + ".idx", "rb").read()) == before
    assert not [p for p in os.listdir(os.path.dirname(good)) if ".tmp" in p]


def test_dtype_must_hold_the_vocabulary():
    check_dtype_holds_vocab(np.uint16, 65536)
    with pytest.raises(IndexedDatasetError, match="int32"):
        check_dtype_holds_vocab(np.uint16, 65537)
    with pytest.raises(IndexedDatasetError, match="not an integer"):
        check_dtype_holds_vocab(np.float32, 10)
    assert ix.best_dtype(65499) == np.uint16 and ix.best_dtype(65500) == np.int32


def test_writer_refuses_ids_that_do_not_fit(tmp_path):
    with pytest.raises(IndexedDatasetError, match="do not fit dtype uint16"):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_document([1, 70000])
    assert not os.listdir(tmp_path)
