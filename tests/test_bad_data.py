"""Corrupt or mismatched data is refused with one clear line before training, merging or trusting it."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_glm.data.blended_dataset import build_train_valid_test_datasets
from megatron_glm.data.indexed import IndexedDatasetError, IndexedDatasetWriter
from megatron_glm.data_prep.merge import main as merge
from megatron_glm.data_prep.preprocess import main as preprocess


def md5s(folder):
    """The files directly in ``folder`` and their digests: what must survive a refused command."""
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder))
    return {p: hashlib.md5(open(p, "rb").read()).hexdigest() for p in paths if os.path.isfile(p)}


@pytest.fixture
def dataset(tmp_path, data):
    """A private copy of the session's corpus (prefix, .meta.json included), free to damage."""
    prefix, model = data
    out = str(tmp_path / "docs")
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(prefix + ext, out + ext)
    return out, model


def open_for_training(prefix, tokenizer, tmp_path):
    return build_train_valid_test_datasets(
        [prefix], "100,0,0", 64, [10, 0, 0], cache_dir=str(tmp_path / "cache"), tokenizer=tokenizer
    )


def scribble_tokens(prefix, value):
    """Ids no tokenizer of ours makes, in the middle of the .bin (sizes all stay consistent)."""
    with open(prefix + ".bin", "r+b") as f:
        f.seek(os.path.getsize(prefix + ".bin") // 2 & ~1)
        f.write(np.asarray([value] * 4, dtype=np.uint16).tobytes())


def test_token_ids_beyond_the_vocabulary_stop_training_before_it_starts(
    dataset, tokenizer, tmp_path
):
    prefix, _ = dataset
    open_for_training(prefix, tokenizer, tmp_path)  # sound data opens
    scribble_tokens(prefix, 60000)
    with pytest.raises(
        IndexedDatasetError,
        match=r"token ids run from 0 to 60000, outside the tokenizer's 1500 ids",
    ):
        # the cached range of the sound file is not reused
        open_for_training(prefix, tokenizer, tmp_path)


def test_a_changed_dtype_code_disagrees_with_the_record(dataset, tokenizer, tmp_path):
    prefix, _ = dataset
    with open(prefix + ".idx", "r+b") as f:
        f.seek(17)
        f.write(b"\x03")  # int16: same item size, so every size still adds up
    with pytest.raises(IndexedDatasetError, match="dtype uint16 recorded, int16 in the .idx"):
        open_for_training(prefix, tokenizer, tmp_path)


def test_without_a_record_the_ids_are_checked_and_the_missing_check_is_said(
    dataset, tokenizer, tmp_path, caplog
):
    prefix, _ = dataset
    os.remove(prefix + ".meta.json")  # as Megatron's preprocess leaves it
    with caplog.at_level("WARNING"):
        open_for_training(prefix, tokenizer, tmp_path)
    assert "has no .meta.json" in caplog.text and "cannot be checked" in caplog.text
    scribble_tokens(prefix, 1500)
    with pytest.raises(IndexedDatasetError, match="outside the tokenizer's 1500 ids"):
        open_for_training(prefix, tokenizer, tmp_path)


def pretrain(dataset, tmp_path):
    prefix, model = dataset
    argv = [
        "--data-path",
        prefix,
        "--tokenizer-model",
        model,
        "--num-layers",
        "1",
        "--hidden-size",
        "16",
        "--num-attention-heads",
        "2",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "1",
        "--train-iters",
        "1",
        "--split",
        "100,0,0",
        "--data-cache-path",
        str(tmp_path / "cache"),
        "--save",
        str(tmp_path / "ckpt"),
    ]
    return subprocess.run(
        [sys.executable, "-m", "megatron_glm.training.pretrain", *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_glm_pretrain_names_a_corrupt_index_in_one_line(dataset, tmp_path):
    prefix, _ = dataset
    with open(prefix + ".idx", "r+b") as f:  # one length in the middle set to 2^31 - 1
        f.seek(34 + 4 * 100)
        f.write(struct.pack("<i", 2**31 - 1))
    before = md5s(os.path.dirname(prefix))
    result = pretrain(dataset, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "docs.idx: sequence 101 starts at byte" in result.stderr
        and "re-run glm-preprocess" in result.stderr
    )
    assert md5s(os.path.dirname(prefix)) == before and not (tmp_path / "ckpt" / "latest").exists()


def test_verify_reports_sound_and_damaged_datasets(dataset, capsys):
    prefix, model = dataset
    assert preprocess(["--verify", prefix]) == 0
    assert "ok: 1,500 documents" in capsys.readouterr().out
    scribble_tokens(prefix, 1500)
    assert preprocess(["--verify", prefix]) == 1
    assert (
        "token ids run from 0 to 1500, outside the tokenizer's 1500 ids" in capsys.readouterr().err
    )
    os.remove(prefix + ".meta.json")  # no record: only the tokenizer flags give the vocabulary
    assert preprocess(["--verify", prefix]) == 0
    assert "not checked against a vocabulary" in capsys.readouterr().out
    assert preprocess(["--verify", prefix, "--tokenizer-model", model]) == 1
    assert "outside the tokenizer's 1500 ids" in capsys.readouterr().err


def test_merge_checks_ids_and_tokenizers_and_carries_the_record(dataset, tmp_path, capsys):
    prefix, _ = dataset
    out = str(tmp_path / "merged")
    assert merge(["--input", prefix, prefix, "--output-prefix", out]) == 0
    meta = json.load(open(out + ".meta.json"))
    original = json.load(open(prefix + ".meta.json"))
    assert (
        meta["tokenizer"] == original["tokenizer"]
        and meta["documents"] == 2 * original["documents"]
    )
    assert meta["tokens"] == 2 * original["tokens"]
    assert preprocess(["--verify", out]) == 0

    other = str(tmp_path / "other")  # the same pair, recorded as made by another tokenizer
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, other + ext)
    json.dump(
        {**original, "tokenizer": {**original["tokenizer"], "fingerprint": "another"}},
        open(other + ".meta.json", "w"),
    )
    capsys.readouterr()
    before = md5s(tmp_path)
    assert merge(["--input", prefix, other, "--output-prefix", str(tmp_path / "m2")]) == 1
    assert "different tokenizers" in capsys.readouterr().err and md5s(tmp_path) == before
    assert (
        merge(["--input", prefix, other, "--output-prefix", str(tmp_path / "m2"), "--force"]) == 0
    )
    assert not os.path.exists(tmp_path / "m2.meta.json")

    scribble_tokens(prefix, 1500)
    capsys.readouterr()
    assert merge(["--input", prefix, prefix, "--output-prefix", str(tmp_path / "m4")]) == 1
    assert "outside the tokenizer's 1500 ids" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m4.bin") and not [
        n for n in os.listdir(tmp_path) if ".tmp" in n
    ]


def test_merge_of_a_corrupt_input_writes_nothing(dataset, tmp_path, capsys):
    prefix, _ = dataset
    with open(prefix + ".idx", "r+b") as f:
        f.seek(34 + 4 * 10)
        f.write(struct.pack("<i", -5))
    assert merge(["--input", prefix, "--output-prefix", str(tmp_path / "m")]) == 1
    assert "sequence 10 has a negative length" in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("m.")]


def test_an_empty_corpus_is_an_error_unless_asked_for(tmp_path, spm_model, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        json.dumps({"title": "no text key"}) + "\n" + json.dumps({"title": "again"}) + "\n"
    )
    argv = [
        "--input",
        str(corpus),
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer-model",
        spm_model,
        "--workers",
        "1",
        "--no-progress",
    ]
    assert preprocess(argv) == 1
    err = capsys.readouterr().err
    assert "no documents" in err and "--json-keys text" in err and "--allow-empty" in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]
    assert preprocess(argv + ["--allow-empty"]) == 0
    assert os.path.exists(tmp_path / "out_text_document.idx")


def test_preprocess_into_a_folder_it_cannot_write_is_one_line(tmp_path, corpus, spm_model, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert (
        preprocess(
            [
                "--input",
                corpus[0],
                "--output-prefix",
                str(blocker / "out"),
                "--tokenizer-model",
                spm_model,
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        "cannot write" in err and "a-file/out_text_document.bin" in err and "Traceback" not in err
    )


def test_a_full_disk_leaves_no_temporary_files(tmp_path):
    """ENOSPC on the last flush, and again when the file is closed: the clean-up survives both."""
    w = IndexedDatasetWriter(str(tmp_path / "d"), np.uint16)
    w.add_document(list(range(100)))
    w._bin.close()
    # a device whose every write fails with ENOSPC
    w._bin = open("/dev/full", "wb", buffering=1 << 20)
    w._bin.write(b"tokens still in the buffer")
    with pytest.raises(OSError, match="No space left"):
        w.finalize()
    assert os.listdir(tmp_path) == []
