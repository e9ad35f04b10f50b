"""glm-preprocess end to end: output decodes to the input, invariance, bad lines, safety of outputs."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_glm.data.indexed import IndexedDataset
from megatron_glm.data.tokenizer import TokenizerSpec
from megatron_glm.data_prep.preprocess import PreprocessError, main, preprocess
from megatron_glm.data_prep.verify import verify_dataset
from tests.helpers import write_jsonl


def run(inputs, prefix, spm_model, **kw):
    return preprocess(inputs, str(prefix), TokenizerSpec(model=spm_model), **kw)


def files_of(prefix):
    return {ext: open(f"{prefix}{ext}", "rb").read() for ext in (".bin", ".idx")}


def test_output_decodes_to_the_input(tmp_path, corpus, spm_model, tokenizer):
    path, texts = corpus
    summary = run([path], tmp_path / "out", spm_model, append_eod=True)
    ds = IndexedDataset(tmp_path / "out_text_document")
    assert "ok:" in verify_dataset(str(tmp_path / "out_text_document"), tokenizer)
    assert summary.docs == ds.num_documents == len(texts)
    assert summary.tokens == ds.num_tokens and not summary.skipped
    for d, text in enumerate(texts):
        tokens = ds.document(d).tolist()
        assert tokens[-1] == tokenizer.eod_id
        assert tokenizer.decode(tokens[:-1]) == text
    meta = json.load(open(tmp_path / "out_text_document.meta.json"))
    assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint() and meta["documents"] == len(
        texts
    )


def test_same_bytes_whatever_the_workers_batches_and_compression(tmp_path, corpus, spm_model):
    """1 or 2 worker processes, tiny or large batches, plain/gz/zst, file/glob/folder: one output."""
    zstandard = pytest.importorskip("zstandard")
    path, _ = corpus
    ref = run([path], tmp_path / "ref", spm_model, append_eod=True, workers=1)
    expected = files_of(tmp_path / "ref_text_document")
    folder = tmp_path / "inputs"
    folder.mkdir()
    raw = open(path, "rb").read()
    half = raw.index(b"\n", len(raw) // 2) + 1
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(raw[:half]))
    (folder / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw[half:]))
    cases = {
        "w2": dict(inputs=[path], workers=2, batch_bytes=8192),
        "w2-big": dict(inputs=[path], workers=2),
        "w1-tiny": dict(inputs=[path], workers=1, batch_bytes=100),
        "folder": dict(inputs=[str(folder)], workers=2),
        "glob": dict(inputs=[str(folder / "*.json*")], workers=1),
    }
    for name, kw in cases.items():
        inputs = kw.pop("inputs")
        summary = run(inputs, tmp_path / name, spm_model, append_eod=True, **kw)
        assert files_of(tmp_path / f"{name}_text_document") == expected, name
        assert (summary.docs, summary.tokens) == (ref.docs, ref.tokens)


def test_several_json_keys_stay_aligned(tmp_path, spm_model, tokenizer):
    rows = [{"title": f"title {i}", "text": f"body number {i} " * (i + 1)} for i in range(20)]
    rows.insert(5, {"text": "a body without a title"})  # dropped from both datasets
    path = write_jsonl(tmp_path / "two.jsonl", rows)
    summary = run([path], tmp_path / "kv", spm_model, json_keys=["title", "text"])
    titles, bodies = (
        IndexedDataset(tmp_path / "kv_title_document"),
        IndexedDataset(tmp_path / "kv_text_document"),
    )
    assert titles.num_documents == bodies.num_documents == 20
    assert summary.skipped == {"missing-key": 1} and summary.examples == [f"{path}:6: missing-key"]
    for i in range(20):
        assert tokenizer.decode(titles.document(i).tolist()) == f"title {i}"
        assert tokenizer.decode(bodies.document(i).tolist()) == f"body number {i} " * (i + 1)


BAD_LINES = [
    (b'{"text": 5}', "not-a-string"),
    (b"this is not json", "malformed-json"),
    (b'\xff\xfe{"text": "latin-1 bytes"}', "invalid-utf8"),
    (b'{"body": "wrong key"}', "missing-key"),
    (b'{"text": "   \\n  "}', "empty"),
    (b'["a", "list"]', "not-an-object"),
    (b'{"text": "truncated', "malformed-json"),
]


@pytest.mark.parametrize("keys", [["text"], ["title", "text"]])
def test_batch_parsing_gives_every_line_parse_lines_verdict(keys):
    """The batch parser's fast test for usable lines agrees with parse_line on every kind of line."""
    from megatron_glm.data_prep.jsonl import BLANK, parse_line, parse_lines

    lines = [line for line, _ in BAD_LINES] + [
        b"",
        b"   ",
        b'{"text": "ok", "title": "t"}',
        b'{"title": "t"}',
        b'{"text": "", "title": "t"}',
        b'{"text": "x", "title": 3}',
        b'{"text": "x", "title": "  "}',
        b'"a string"',
        b"5",
        b"null",
        b'{"text": "\\u00e9t\\u00e9", "title": "t"}',
        b'{"text": "dup", "text": "last wins", "title": "t"}',
    ]
    good = [line for line in lines if parse_line(line, keys)[0] is None]
    assert good, "some lines are usable"
    # a batch of usable lines only takes a path of its own: try it with each kind of line added
    for batch in [lines, good] + [good[:2] + [line] for line in lines]:
        expect_kept, expect_columns, expect_skips = [], [[] for _ in keys], []
        for number, line in enumerate(batch, 10):
            cause, texts = parse_line(line, keys)
            if cause is None:
                expect_kept.append(number)
                for column, text in zip(expect_columns, texts):
                    column.append(text)
            elif cause != BLANK:
                expect_skips.append((number, cause))
        assert parse_lines(batch, 10, keys) == (expect_kept, expect_columns, expect_skips)


def corpus_with_bad_lines(tmp_path):
    rows = []
    for k, (line, _) in enumerate(BAD_LINES):
        rows.append({"text": f"good document {k}"})
        rows.append(line)
    rows.append(b"")  # a blank line is not a document and not an error
    rows.append({"text": "the last good document"})
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_bad_lines_are_skipped_counted_and_located(tmp_path, spm_model, capsys):
    path = corpus_with_bad_lines(tmp_path)
    assert (
        main(
            [
                "--input",
                path,
                "--output-prefix",
                str(tmp_path / "o"),
                "--tokenizer-model",
                spm_model,
                "--workers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert IndexedDataset(tmp_path / "o_text_document").num_documents == len(BAD_LINES) + 1
    counts = {}
    for _, cause in BAD_LINES:
        counts[cause] = counts.get(cause, 0) + 1
    assert f"skipped {len(BAD_LINES)} line(s)" in out
    for cause, n in counts.items():
        assert f"{cause} {n}" in out
    for k, (_, cause) in enumerate(BAD_LINES[:5]):  # the first five are listed with file:line
        assert f"{path}:{2 * k + 2}: {cause}" in out


def test_strict_stops_at_the_first_bad_line_and_writes_nothing(tmp_path, spm_model, capsys):
    path = corpus_with_bad_lines(tmp_path)
    rc = main(
        [
            "--input",
            path,
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-model",
            spm_model,
            "--strict",
            "--no-progress",
        ]
    )
    assert rc == 1
    assert f"{path}:2: not-a-string" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_existing_output_is_kept_without_overwrite(tmp_path, corpus, spm_model, capsys):
    run([corpus[0]], tmp_path / "o", spm_model)
    before = files_of(tmp_path / "o_text_document")
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "something else entirely"}])
    args = [
        "--input",
        other,
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer-model",
        spm_model,
        "--no-progress",
    ]
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert files_of(tmp_path / "o_text_document") == before
    assert main(args + ["--overwrite"]) == 0
    assert IndexedDataset(tmp_path / "o_text_document").num_documents == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input", "/nonexistent/*.jsonl"], "matches no file"),
        (["--input", "/nonexistent/file.jsonl"], "not a file, a folder or a glob"),
        (["--input", "{corpus}", "--tokenizer-type", "nope"], "unknown tokenizer type"),
        (["--input", "{corpus}", "--json-keys", "text", "text"], "repeats a key"),
    ],
)
def test_bad_arguments_are_named(tmp_path, corpus, spm_model, capsys, argv, message):
    argv = [a.replace("{corpus}", corpus[0]) for a in argv]
    rc = main(
        argv
        + ["--output-prefix", str(tmp_path / "o"), "--tokenizer-model", spm_model, "--no-progress"]
    )
    assert rc == 1 and message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_truncated_gzip_is_an_error_not_a_partial_dataset(tmp_path, corpus, spm_model):
    data = gzip.compress(open(corpus[0], "rb").read())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(PreprocessError, match="cut.jsonl.gz: cannot be read past line"):
        run([str(tmp_path / "cut.jsonl.gz")], tmp_path / "o", spm_model)
    assert os.listdir(tmp_path) == ["cut.jsonl.gz"]


def start_on_a_pipe(tmp_path, corpus, spm_model, extra=()):
    """glm-preprocess reading a named pipe we feed by hand, so we can stop it mid-run for sure."""
    fifo = tmp_path / "feed.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megatron_glm.data_prep.preprocess",
            "--input",
            str(fifo),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-model",
            spm_model,
            "--workers",
            "2",
            "--no-progress",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    writer = open(fifo, "wb")
    lines = open(corpus[0], "rb").read()
    writer.write(lines * 3)  # several batches: the writers have started and hold temporary files
    writer.flush()
    deadline = time.time() + 60
    while not any(".tmp-" in p for p in os.listdir(tmp_path)):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    return proc, writer


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_no_dataset_and_keeps_the_old_one(tmp_path, corpus, spm_model, sig):
    run([corpus[0]], tmp_path / "o", spm_model)  # an earlier dataset that --overwrite would replace
    before = files_of(tmp_path / "o_text_document")
    import psutil

    proc, writer = start_on_a_pipe(tmp_path, corpus, spm_model, ["--overwrite"])
    workers = psutil.Process(proc.pid).children()
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    writer.close()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "no worker outlives the main process, not even after SIGKILL"
    assert files_of(tmp_path / "o_text_document") == before
    leftovers = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    if sig == signal.SIGTERM:
        assert rc == 130 and b"nothing written" in proc.stderr.read()
        assert leftovers == [], "a terminated run cleans up after itself"
    else:
        assert all(not p.endswith((".bin", ".idx")) for p in leftovers), "temporary names only"


def test_help_starts_without_heavy_imports():
    """`glm-preprocess --help` must not pay for torch/numpy/tokenizer imports (start-up < 2 s)."""
    code = (
        "import sys; from megatron_glm.data_prep import preprocess, train_tokenizer, merge;"
        "preprocess.build_parser();"
        "print(sorted(m for m in ('torch', 'numpy', 'sentencepiece', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
    subprocess.run(
        [sys.executable, "-m", "megatron_glm.data_prep.preprocess", "--help"],
        check=True,
        capture_output=True,
    )


def test_merge_cli_concatenates(tmp_path, corpus, spm_model):
    from megatron_glm.data_prep import merge

    run([corpus[0]], tmp_path / "a", spm_model)
    shutil.copy(corpus[0], tmp_path / "again.jsonl")
    run([str(tmp_path / "again.jsonl")], tmp_path / "b", spm_model)
    a = IndexedDataset(tmp_path / "a_text_document")
    assert (
        merge.main(
            [
                "--input",
                str(tmp_path / "a_text_document"),
                str(tmp_path / "b_text_document"),
                "--output-prefix",
                str(tmp_path / "ab"),
            ]
        )
        == 0
    )
    ab = IndexedDataset(tmp_path / "ab")
    assert ab.num_documents == 2 * a.num_documents
    assert np.array_equal(ab.document(a.num_documents + 7), a.document(7))


def test_shards_merged_equal_one_run_byte_for_byte(tmp_path, corpus, spm_model):
    """--shard-index I --num-shards N over several files (one gzip, which goes whole to one shard): the N outputs,
    merged in order, are byte-identical to one run; a shard's report of a bad line points at that line."""
    from megatron_glm.data_prep import merge

    path, texts = corpus
    lines = open(path, "rb").read().splitlines(keepends=True)
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.jsonl"
    a.write_bytes(b"".join(lines[:700]))
    with gzip.open(b, "wb") as f:
        f.write(b"".join(lines[700:900]))
    bad = b'{"text": 5}\n'
    c.write_bytes(b"".join(lines[900:1200]) + bad + b"".join(lines[1200:]))
    inputs = [str(a), str(b), str(c)]
    whole = run(inputs, tmp_path / "whole", spm_model, append_eod=True)
    for n in (3, 7):
        shards, skipped = [], []
        for i in range(n):
            summary = run(inputs, tmp_path / f"n{n}", spm_model, append_eod=True, shard_of=(i, n))
            shards += summary.outputs
            skipped += summary.examples
        assert shards == sorted(shards), "shard names sort in shard order"
        assert len(skipped) == 1 and skipped[0].startswith(str(c)), skipped
        # "FILE:N" or "FILE (from byte B):N": the line is the bad one
        where, number, _ = skipped[0].rsplit(":", 2)
        offset = int(where.split("from byte ")[1].rstrip(")")) if "from byte" in where else 0
        assert c.read_bytes()[offset:].splitlines(keepends=True)[int(number) - 1] == bad
        out = tmp_path / f"merged{n}"
        assert merge.main(["--input", *shards, "--output-prefix", str(out)]) == 0
        assert files_of(out) == files_of(tmp_path / "whole_text_document"), n
    assert whole.docs == len(texts)


@pytest.mark.parametrize("batch_bytes", [1, 7, 100, 1 << 20])
def test_line_batches_are_the_files_lines_whatever_the_block_size(tmp_path, batch_bytes):
    """Blocks are cut at newlines only (a \\r stays inside its line; a line may be longer than a block): the shards'
    lines, in order, are the file's lines; each batch is numbered from its shard's first byte; the bytes add up."""
    from megatron_glm.data_prep.jsonl import Piece, iter_line_batches, shard

    rng = np.random.default_rng(batch_bytes)
    pieces = [b"", b"\r", b"x" * 250, b'{"text": "a\\nb"}', b"\xff\xfe", b"  ", b"{}"]
    lines = [
        pieces[i] + bytes(rng.integers(97, 123, rng.integers(0, 30)).astype(np.uint8))
        for i in rng.integers(0, len(pieces), 120)
    ] + [b"last line, no newline"]
    data = b"\n".join(lines)
    plain, packed = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    plain.write_bytes(data)
    with gzip.open(packed, "wb") as f:
        f.write(data)
    for n in (1, 2, 5, 13):
        got, raw = [], 0
        for i in range(n):
            for batch in iter_line_batches(shard([str(plain), str(packed)], i, n), batch_bytes):
                offset = (
                    int(batch.path.split("from byte ")[1].rstrip(")"))
                    if "from byte" in batch.path
                    else 0
                )
                if batch.lines:
                    start = 0 if batch.path.endswith("gz") else offset
                    assert data[start:].split(b"\n")[batch.first_line - 1] == batch.lines[0]
                got += batch.lines
                raw += batch.raw_bytes
        assert got == lines + lines, n
        assert raw == len(data) + os.path.getsize(packed), n
    # a cut exactly at a line's start, or one byte either side of it
    starts = np.cumsum([0] + [len(line) + 1 for line in lines[:40]])
    for cut in sorted({int(c) for s in starts for c in (s - 1, s, s + 1) if 0 < c < len(data)}):
        halves = [Piece(str(plain), 0, cut), Piece(str(plain), cut)]
        assert [
            line for b in iter_line_batches(halves, batch_bytes) for line in b.lines
        ] == lines, cut


def test_shard_flags_are_checked(tmp_path, corpus, spm_model, capsys):
    base = [
        "--input",
        corpus[0],
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer-model",
        spm_model,
    ]
    with pytest.raises(SystemExit):
        main(base + ["--shard-index", "3", "--num-shards", "3"])
    assert "must be in 0..2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--shard-index", "0"])
    assert "go together" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def punkt_reference():
    """NLTK's Punkt as the test builds it: trained English parameters if installed, else untrained."""
    from nltk.tokenize import punkt

    try:
        params = punkt.PunktTokenizer("english")._params
    except LookupError:
        params = None
    return punkt.PunktSentenceTokenizer(train_text=params)


def test_split_sentences_one_sequence_per_sentence(tmp_path, spm_model, tokenizer):
    """--split-sentences: Megatron's layout, {prefix}_{key}_sentence, a sequence per non-empty sentence, the
    document index at document ends, [eos] after each document's last sentence; shards merge to the same bytes."""
    from megatron_glm.data_prep import merge

    texts = [
        "The cat sat. The dog ran! Did it? Yes.",
        "One sentence only",
        "Dr. Who came.  Then left.\n\nNew part.",
        "Short. " * 40,
    ]
    path = tmp_path / "in.jsonl"
    write_jsonl(path, [{"text": t} for t in texts])
    run([str(path)], tmp_path / "s", spm_model, append_eod=True, split_sentences=True)
    ds = IndexedDataset(tmp_path / "s_text_sentence")
    splitter = punkt_reference()
    expected = [[tokenizer.encode(s) for s in splitter.tokenize(t)] for t in texts]
    expected = [[s for s in doc if s] for doc in expected]
    assert ds.num_documents == len(texts)
    assert np.diff(ds.document_indices).tolist() == [len(doc) for doc in expected]
    seq = 0
    for doc in expected:
        for k, sentence in enumerate(doc):
            got = ds.get(seq).tolist()
            assert got == sentence + ([tokenizer.eod_id] if k == len(doc) - 1 else []), (seq, got)
            seq += 1
    meta = json.load(open(tmp_path / "s_text_sentence.meta.json"))
    assert meta["split_sentences"] == {"lang": "english", "keep_newlines": False}
    shards = [
        run(
            [str(path)],
            tmp_path / "sh",
            spm_model,
            append_eod=True,
            split_sentences=True,
            shard_of=(i, 2),
        ).outputs[0]
        for i in range(2)
    ]
    assert merge.main(["--input", *shards, "--output-prefix", str(tmp_path / "m")]) == 0
    assert files_of(tmp_path / "m") == files_of(tmp_path / "s_text_sentence")


def test_keep_newlines_keeps_the_whitespace_between_sentences():
    from megatron_glm.data_prep.sentences import load_splitter, split

    text = "First line here.\nSecond one!\n\nA new paragraph? It goes on.  Two spaces."
    plain, kept = (
        split(load_splitter("english"), text),
        split(load_splitter("english", keep_newlines=True), text),
    )
    assert "".join(kept) == text, kept
    assert (
        [s.strip() for s in kept] == plain == [s.strip() for s in punkt_reference().tokenize(text)]
    )
    assert kept[1] == "Second one!\n\n"


def test_sentence_flags_are_checked(tmp_path, corpus, spm_model, capsys, monkeypatch):
    base = [
        "--input",
        corpus[0],
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer-model",
        spm_model,
        "--no-progress",
    ]
    assert main(base + ["--keep-newlines"]) == 1
    assert "only means something with --split-sentences" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "nltk", None)  # as if NLTK were not installed
    monkeypatch.setitem(sys.modules, "nltk.tokenize", None)
    assert main(base + ["--split-sentences"]) == 1
    assert "pip install nltk" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
