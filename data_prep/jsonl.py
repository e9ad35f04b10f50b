"""Reading JSONL corpora: inputs given as files, globs or folders; plain, gzip or zstd.

Lines travel as raw bytes in batches (decoding and JSON parsing happen in the workers), and
each document's verdict is one of ``SKIP_CAUSES`` or its texts, so every CLI that reads a
corpus skips, counts and reports bad lines the same way.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

try:  # ~3x faster parsing; the standard library is the fallback
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is in install_requires
    _loads = json.loads

SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
SKIP_CAUSES = (
    "invalid-utf8",
    "malformed-json",
    "not-an-object",
    "missing-key",
    "not-a-string",
    "empty",
)


class CorpusError(ValueError):
    """Inputs that cannot be read at all (nothing matches, unreadable file)."""


def expand_inputs(specs: Sequence[str]) -> list[str]:
    """Files as given, globs expanded, folders searched recursively for JSONL files; sorted, unique."""
    out: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if name.endswith(SUFFIXES)
            )
            if not found:
                raise CorpusError(
                    f"input folder {spec} holds no file ending in {', '.join(SUFFIXES)}"
                )
        elif os.path.exists(spec):  # a file, or a named pipe fed by another program
            found = [spec]
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise CorpusError(f"input pattern {spec!r} matches no file")
        else:
            raise CorpusError(f"input {spec} is not a file, a folder or a glob that matches files")
        out.extend(p for p in found if p not in out)
    return out


def open_binary(path: str):
    """A binary line reader over a plain, .gz or .zst file, and the raw file (for progress)."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:  # pragma: no cover - zstandard is in install_requires
            raise CorpusError(
                f"{path}: reading .zst needs the zstandard package (pip install zstandard)"
            ) from e
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20), raw
    return raw, raw


@dataclass
class LineBatch:
    path: str  # for messages: "FILE", or "FILE (from byte B)" for a shard that starts inside it
    first_line: int  # 1-based line number of the batch's first line (counted from byte B, if given)
    data: bytes  # whole lines, newlines included: one object to ship to a worker, split there
    raw_bytes: int  # bytes of the (possibly compressed) file consumed by this batch

    @property
    def lines(self) -> list[bytes]:
        """The lines, without their newlines (the JSON parser ignores it); a file's last line may lack one."""
        lines = self.data.split(b"\n")
        if lines[-1] == b"":  # after the last newline, or an empty batch
            lines.pop()
        return lines


@dataclass(frozen=True)
class Piece:
    """The lines of ``path`` that start in bytes ``[start, end)`` (``end`` None: to the end of the file)."""

    path: str
    start: int = 0
    end: int | None = None


def shard(paths: Sequence[str], index: int, count: int) -> list[Piece]:
    """Shard ``index`` of ``count``: a contiguous, deterministic share of the inputs, in order.

    The inputs' bytes are cut into ``count`` equal ranges, one after the other; a line belongs to
    the range that holds its first byte, so the shards, concatenated in order, are the corpus
    exactly. A compressed file cannot be entered in the middle: it goes whole to the shard that
    holds its first byte. Everything a shard needs is the input list and the file sizes, so N
    array tasks agree without talking to each other.
    """
    if not 0 <= index < count:
        raise CorpusError(f"--shard-index {index} is outside 0..{count - 1} (--num-shards {count})")
    pipes = [p for p in paths if not os.path.isfile(p)]
    if pipes:
        raise CorpusError(f"{pipes[0]} is not a regular file: a pipe cannot be split into shards")
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    lo, hi = total * index // count, total * (index + 1) // count
    pieces, offset = [], 0
    for path, size in zip(paths, sizes):
        if path.endswith((".gz", ".zst")):
            if size and lo <= offset < hi:
                pieces.append(Piece(path))
        elif max(lo, offset) < min(hi, offset + size):
            end = None if hi >= offset + size else hi - offset
            pieces.append(Piece(path, max(lo, offset) - offset, end))
        offset += size
    return pieces


def _open_at(piece: Piece):
    """The reader positioned at the first line that starts at or after ``piece.start``, and its byte offset."""
    reader, raw = open_binary(piece.path)
    if not piece.start:
        return reader, raw, 0
    raw.seek(piece.start - 1)
    if raw.read(1) != b"\n":  # inside a line: it belongs to the piece before
        raw.readline()
    return reader, raw, raw.tell()


def _read_block(reader, size: int) -> bytes:
    """About ``size`` bytes, fewer only at the end of the input.

    One system call per ``read1``, back in Python between them: ``read(size)`` loops in C over a
    pipe's 64 KB reads, and a SIGTERM that lands inside that loop is not seen until the read
    returns, which a quiet pipe may never let it do.
    """
    parts, got = [], 0
    while got < size:
        part = reader.read1(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def iter_line_batches(
    inputs: Sequence[str | Piece], batch_bytes: int = 1 << 20
) -> Iterator[LineBatch]:
    """Yield consecutive whole lines in batches of about ``batch_bytes`` (memory stays bounded), at least one batch
    per input.

    The file is read in blocks and cut at newlines: no Python work per line here, so the main process keeps up with
    any number of workers.
    """
    for piece in inputs:
        piece = piece if isinstance(piece, Piece) else Piece(piece)
        path = piece.path
        reader, raw, begin = _open_at(piece)
        compressed = reader is not raw
        limit = None if piece.end is None else piece.end - begin  # bytes in which lines may start
        if begin:  # counting the lines before would read the file up to here: number them from here
            path = f"{path} (from byte {begin})"
        # taken: bytes of the lines yielded (uncompressed)
        first, taken, reported, carry = (
            1,
            0,
            0,
            b"",
        )
        # the piece's first line started before it: nothing is its own
        last = limit is not None and limit <= 0
        with reader, raw:
            try:
                while True:
                    data = b""
                    if not last:
                        block = _read_block(reader, batch_bytes)
                        data, carry, last = carry + block, b"", not block
                    if limit is not None and not last and taken + len(data) >= limit:
                        # the piece ends in here: its lines are those that start before the limit
                        cut = data.find(b"\n", limit - 1 - taken)
                        if cut == -1:  # the last one goes on past this block
                            carry = data
                            continue
                        data, last = data[: cut + 1], True
                    elif not last:
                        cut = data.rfind(b"\n")
                        if cut == -1:  # one line longer than a block
                            carry = data
                            continue
                        data, carry = data[: cut + 1], data[cut + 1 :]
                    taken += len(data)
                    consumed = raw.tell() if compressed else taken
                    yield LineBatch(path, first, data, consumed - reported)
                    first += data.count(b"\n")
                    reported = consumed
                    if last:
                        break
            except (OSError, EOFError) as e:  # truncated gzip/zstd stream, unreadable file
                line = first + carry.count(b"\n") - 1
                raise CorpusError(f"{path}: cannot be read past line {line}: {e}") from e


BLANK = "blank"  # parse_line's verdict on a blank line: not a document, and not counted as skipped


def parse_line(line: bytes, keys: Sequence[str]) -> tuple[str | None, list[str] | None]:
    """``(None, texts)`` for a usable document, ``(cause, None)`` for a skipped one (``BLANK`` for a blank line).

    The bytes go to the JSON parser as they are (it checks UTF-8 itself); only a line it refuses
    is looked at again, to tell a blank line, invalid UTF-8 and malformed JSON apart.
    """
    try:
        obj = _loads(line)
    except ValueError:
        if is_blank(line):
            return BLANK, None
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return "invalid-utf8", None
        return "malformed-json", None
    if not isinstance(obj, dict):
        return "not-an-object", None
    texts = []
    for key in keys:
        value = obj.get(key, _MISSING)
        if value is _MISSING:
            return "missing-key", None
        if not isinstance(value, str):
            return "not-a-string", None
        if not value or value.isspace():
            return "empty", None
        texts.append(value)
    return None, texts


_MISSING = object()


def parse_lines(lines: Sequence[bytes], first_line: int, keys: Sequence[str]):
    """``parse_line`` over a batch: ``(line numbers kept, texts per key in those lines, [(number, cause)])``.

    A batch of usable lines only is recognised without a Python call per line (parsing is most of what a worker
    does besides tokenizing); any other batch gets ``parse_line``'s verdict line by line.
    """
    try:  # the usual batch: every line an object whose texts are all usable; one C-level pass over them
        objs = list(map(_loads, lines))
        columns = [
            [obj[k] for obj in objs] for k in keys
        ]  # (a list, a string, a number: TypeError)
    except (ValueError, KeyError, TypeError):
        pass
    else:
        if all(
            set(map(type, c)) <= {str} and all(c) and not any(map(str.isspace, c)) for c in columns
        ):
            return list(range(first_line, first_line + len(lines))), columns, []
    kept, columns, skips = [], [[] for _ in keys], []
    # a batch with some other line: each line's verdict
    for number, line in enumerate(lines, first_line):
        cause, texts = parse_line(line, keys)
        if cause is None:
            kept.append(number)
            for column, text in zip(columns, texts):
                column.append(text)
        elif cause != BLANK:
            skips.append((number, cause))
    return kept, columns, skips


def is_blank(line: bytes) -> bool:
    """Blank lines (a trailing newline, say) are not documents and are not counted as skipped."""
    return not line.strip()
