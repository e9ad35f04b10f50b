"""Megatron's indexed binary dataset: ``{prefix}.bin`` (tokens) and ``{prefix}.idx`` (index).

Byte-compatible with Megatron-LM / megatron-core (the same .idx layout), so corpora
move freely between the two stacks. The writer streams: its memory does not grow with the
corpus (lengths and document boundaries spill to temporary files), and it writes under
temporary names that are renamed only when the index is complete, so an interrupted run
never leaves a valid-looking partial dataset. The reader memory-maps both files and checks
the header against the file sizes before it trusts a single count, so a corrupt or
truncated file gives an error naming the file, never a segfault or a huge allocation.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc-index length
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_CHUNK = 1 << 22  # entries per chunk when streaming index arrays


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that cannot be read as it is (corrupt, truncated, wrong dtype)."""


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron picks: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def check_dtype_holds_vocab(dtype, vocab_size: int, where: str = "dataset") -> None:
    """Refuse a token dtype too narrow for the vocabulary (ids would wrap silently)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise IndexedDatasetError(f"{where}: token dtype {dtype} is not an integer type")
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise IndexedDatasetError(
            f"{where}: token dtype {dtype} holds ids up to {np.iinfo(dtype).max}, but the "
            f"tokenizer has {vocab_size} ids; re-run glm-preprocess with this tokenizer "
            f"(it picks {best_dtype(vocab_size)} for this vocabulary)"
        )


def dataset_exists(prefix) -> bool:
    return os.path.exists(bin_path(prefix)) and os.path.exists(idx_path(prefix))


class _Spill:
    """An append-only int array that moves to a temporary file past a few MB."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self._chunks: list[np.ndarray] = []
        self._buffered = 0
        self._file = None
        self.size = 0

    def extend(self, values) -> None:
        arr = np.asarray(values, dtype=self.dtype).ravel()
        if arr.size == 0:
            return
        self._chunks.append(arr)
        self._buffered += arr.size
        self.size += arr.size
        if self._buffered >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")
        for arr in self._chunks:
            self._file.write(arr.tobytes())
        self._chunks, self._buffered = [], 0

    def chunks(self) -> Iterator[np.ndarray]:
        if self._file is not None:
            self._file.flush()
            with open(self.path, "rb") as f:
                while True:
                    data = f.read(_CHUNK * self.dtype.itemsize)
                    if not data:
                        break
                    yield np.frombuffer(data, dtype=self.dtype)
        yield from self._chunks

    def last(self) -> int:
        if self._chunks:
            return int(self._chunks[-1][-1])
        with open(self.path, "rb") as f:
            f.seek(-self.dtype.itemsize, os.SEEK_END)
            return int(np.frombuffer(f.read(self.dtype.itemsize), dtype=self.dtype)[0])

    def close(self, remove: bool = True) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if remove and os.path.exists(self.path):
            os.remove(self.path)


class IndexedDatasetWriter:
    """Writes ``{prefix}.bin/.idx``; nothing appears under the final names before ``finalize``.

    Use as a context manager: leaving the block normally finalizes, leaving it by an
    exception removes the temporary files and leaves any previous dataset untouched.
    """

    def __init__(self, prefix, dtype, overwrite: bool = False):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(
                f"unsupported token dtype {self.dtype}; use one of {sorted(map(str, CODE_OF_DTYPE))}"
            )
        if not overwrite:
            for path in (bin_path(self.prefix), idx_path(self.prefix)):
                if os.path.exists(path):
                    raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
        try:
            Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.prefix)
            tag = f".tmp-{os.getpid()}"
            self._bin = open(bin_path(self.prefix) + tag, "wb", buffering=1 << 20)
        except OSError as e:  # read-only, not a folder, full
            raise IndexedDatasetError(
                f"cannot write {bin_path(self.prefix)} ({e.strerror}): choose an output "
                "prefix in a folder you can write to"
            ) from None
        self._bin_tmp = bin_path(self.prefix) + tag
        self._idx_tmp = idx_path(self.prefix) + tag
        self._lengths = _Spill(self._idx_tmp + ".lengths", np.int32)
        self._doc_idx = _Spill(self._idx_tmp + ".docs", np.int64)
        self._doc_idx.extend([0])
        self.num_sequences = 0
        self.num_tokens = 0
        self._done = False

    # -- adding data -------------------------------------------------------------------
    def add_item(self, tokens) -> None:
        """Append one sequence to the current document (close it with ``end_document``)."""
        arr = self._as_tokens(tokens)
        self._bin.write(arr.tobytes())
        self._lengths.extend([arr.size])
        self.num_sequences += 1
        self.num_tokens += arr.size

    def end_document(self) -> None:
        self._doc_idx.extend([self.num_sequences])

    def add_document(self, tokens, lengths: Iterable[int] | None = None) -> None:
        """Append a document made of one sequence, or of several of the given ``lengths``."""
        arr = self._as_tokens(tokens)
        lengths = np.asarray([arr.size] if lengths is None else list(lengths), dtype=np.int64)
        if int(lengths.sum()) != arr.size or (lengths < 0).any():
            raise ValueError(
                f"sequence lengths {lengths.tolist()} do not add up to the {arr.size} tokens given"
            )
        self._bin.write(arr.tobytes())
        self._lengths.extend(lengths)
        self.num_sequences += lengths.size
        self.num_tokens += arr.size
        self._doc_idx.extend([self.num_sequences])

    def add_documents(self, tokens, lengths, sequences_per_doc=None) -> None:
        """Append many documents at once: ``tokens`` concatenated, split into sequences by ``lengths``.

        Each document is one sequence, or ``sequences_per_doc[d]`` consecutive ones (sentences).
        """
        arr = self._as_tokens(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != arr.size:
            raise ValueError(
                f"sequence lengths add up to {int(lengths.sum())}, not the {arr.size} tokens given"
            )
        ends = (
            np.arange(1, lengths.size + 1)
            if sequences_per_doc is None
            else np.cumsum(np.asarray(sequences_per_doc, dtype=np.int64))
        )
        if ends.size and ends[-1] != lengths.size:
            raise ValueError(
                f"documents hold {int(ends[-1])} sequences, not the {lengths.size} given"
            )
        self._bin.write(arr.tobytes())
        self._lengths.extend(lengths)
        self._doc_idx.extend(self.num_sequences + ends)
        self.num_sequences += lengths.size
        self.num_tokens += arr.size

    def add_dataset(self, prefix) -> None:
        """Append a whole existing dataset (merge); its dtype must match."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{idx_path(prefix)}: token dtype {other.dtype} differs from {self.dtype} of the merge; "
                "re-run glm-preprocess so all parts use the same tokenizer"
            )
        lengths, doc_idx = other.sequence_lengths, other.document_indices
        for start in range(0, lengths.size, _CHUNK):
            self._lengths.extend(lengths[start : start + _CHUNK])
        for start in range(1, doc_idx.size, _CHUNK):
            self._doc_idx.extend(
                doc_idx[start : start + _CHUNK].astype(np.int64) + self.num_sequences
            )
        with open(bin_path(prefix), "rb") as f:
            while block := f.read(1 << 24):
                self._bin.write(block)
        self.num_sequences += lengths.size
        self.num_tokens += other.num_tokens
        other.close()

    def _as_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and (
                arr.min() < np.iinfo(self.dtype).min or arr.max() > np.iinfo(self.dtype).max
            ):
                raise IndexedDatasetError(
                    f"token ids {arr.min()}..{arr.max()} do not fit dtype {self.dtype}"
                )
            arr = arr.astype(self.dtype)
        return np.ascontiguousarray(arr).ravel()

    # -- finishing ---------------------------------------------------------------------
    def finalize(self) -> None:
        """Write the index, flush both files, check the pair as a reader would, then rename it into place."""
        if self._done:
            return
        try:
            self._finalize()
        except BaseException:
            self.abort()
            raise

    def _finalize(self) -> None:
        if self._doc_idx.last() != self.num_sequences:
            self.end_document()  # a trailing add_item without end_document
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with open(self._idx_tmp, "wb") as f:
            code = CODE_OF_DTYPE[self.dtype]
            f.write(HEADER.pack(MAGIC, VERSION, code, self.num_sequences, self._doc_idx.size))
            for chunk in self._lengths.chunks():
                f.write(chunk.tobytes())
            pointer = 0
            for chunk in self._lengths.chunks():
                sizes = chunk.astype(np.int64) * self.dtype.itemsize
                ends = np.cumsum(sizes) + pointer
                f.write((ends - sizes).tobytes())
                pointer = int(ends[-1]) if ends.size else pointer
            for chunk in self._doc_idx.chunks():
                f.write(chunk.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._lengths.close()
        self._doc_idx.close()
        IndexedDataset(
            self.prefix, files=(self._idx_tmp, self._bin_tmp)
        ).close()  # never rename a bad pair in
        # An old index must never describe the new .bin, even for a moment.
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        self._done = True

    def abort(self) -> None:
        """Remove every temporary file; any dataset already under the final names stays.

        Each step survives the failure of the one before (closing a file on a full disk raises
        again while flushing), so the temporaries go whatever state the writer was left in.
        """
        if self._done:
            return
        self._done = True
        for close in (self._bin.close, self._lengths.close, self._doc_idx.close):
            try:
                close()
            except OSError:
                pass
        for path in (self._bin_tmp, self._idx_tmp, self._lengths.path, self._doc_idx.path):
            try:
                os.remove(path)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_TEMPORARY = re.compile(r"\.(?:bin|idx|meta\.json)\.tmp-(\d+)(?:\.lengths|\.docs)?")


def remove_stale_temporaries(prefix) -> list[str]:
    """Delete what writers of ``prefix`` that died (SIGKILL, power loss) left: ``*.tmp-PID`` of dead PIDs."""
    folder, base = os.path.split(os.path.abspath(os.fspath(prefix)))
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = _TEMPORARY.fullmatch(name[len(base) :]) if name.startswith(base) else None
        if match and not _pid_alive(int(match.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _corrupt(path, problem: str) -> IndexedDatasetError:
    return IndexedDatasetError(
        f"{path}: {problem}; the file is corrupt or truncated: re-run glm-preprocess to rebuild it"
    )


class IndexedDataset:
    """Memory-mapped reader: random access to sequences and documents without reading the file."""

    def __init__(self, prefix, files: tuple[str, str] | None = None):
        """Open ``prefix``'s pair, or explicit ``files = (idx, bin)`` (a writer's output before its rename)."""
        self.prefix = os.fspath(prefix)
        ipath, bpath = files or (idx_path(self.prefix), bin_path(self.prefix))
        for path in (ipath, bpath):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path} not found; a dataset prefix names a .bin/.idx pair written by glm-preprocess "
                    f"(it writes {{output_prefix}}_{{json_key}}_document.bin/.idx)"
                )
        idx_size = os.path.getsize(ipath)
        if idx_size < HEADER.size:
            raise _corrupt(ipath, f"{idx_size} bytes, shorter than the {HEADER.size}-byte header")
        with open(ipath, "rb") as f:
            magic, version, code, num_seq, doc_len = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise IndexedDatasetError(
                f"{ipath}: not a Megatron indexed dataset (magic {magic!r}, expected {MAGIC!r})"
            )
        if version != VERSION:
            raise IndexedDatasetError(
                f"{ipath}: index version {version} is not supported (only {VERSION})"
            )
        if code not in DTYPE_CODES:
            raise _corrupt(ipath, f"unknown dtype code {code}")
        if np.dtype(DTYPE_CODES[code]).kind not in "iu":
            raise _corrupt(
                ipath,
                f"dtype code {code} ({np.dtype(DTYPE_CODES[code])}) is not an integer type, "
                "so it cannot hold token ids",
            )
        expected = HEADER.size + 12 * num_seq + 8 * doc_len
        if idx_size != expected or doc_len < 1:
            raise _corrupt(
                ipath,
                f"{idx_size} bytes, but its header promises {num_seq} sequences and {doc_len - 1} documents "
                f"({expected} bytes)",
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._idx = np.memmap(ipath, dtype=np.uint8, mode="r")
        buf = self._idx
        off = HEADER.size
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=num_seq, offset=off)
        off += 4 * num_seq
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=num_seq, offset=off)
        off += 8 * num_seq
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=doc_len, offset=off)
        self.num_tokens = self._check_index(ipath) // self.dtype.itemsize

        bin_size = os.path.getsize(bpath)
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise _corrupt(
                bpath,
                f"{bin_size} bytes, but {ipath} describes {self.num_tokens * self.dtype.itemsize} "
                f"bytes of {self.dtype} tokens",
            )
        self._bin = (
            np.memmap(bpath, dtype=self.dtype, mode="r") if bin_size else np.empty(0, self.dtype)
        )
        # derived on first use, then kept
        self._document_lengths = self._fingerprint = self._token_range = None

    def _check_index(self, ipath: str) -> int:
        """The whole index, vectorised in chunks (milliseconds per million sequences); returns the .bin size.

        Lengths are non-negative, every pointer is where the lengths before it end, and the
        document index runs monotonically from 0 to the sequence count: a flipped byte anywhere
        is caught here, not as short samples or an IndexError mid-run.
        """
        itemsize, pointer = self.dtype.itemsize, 0
        for start in range(0, len(self), _CHUNK):
            lengths = self.sequence_lengths[start : start + _CHUNK]
            if lengths.min() < 0:
                bad = start + int(np.argmax(lengths < 0))
                raise _corrupt(
                    ipath,
                    f"sequence {bad} has a negative length ({int(self.sequence_lengths[bad])})",
                )
            sizes = lengths.astype(np.int64) * itemsize
            ends = np.cumsum(sizes) + pointer
            wrong = (ends - sizes) != self.sequence_pointers[start : start + _CHUNK]
            if wrong.any():
                bad = start + int(np.argmax(wrong))
                raise _corrupt(
                    ipath,
                    f"sequence {bad} starts at byte {int(self.sequence_pointers[bad])}, but the "
                    f"lengths before it end at byte {int((ends - sizes)[bad - start])}",
                )
            pointer = int(ends[-1])
        docs = self.document_indices
        if docs[0] != 0 or docs[-1] != len(self):
            raise _corrupt(
                ipath, "document index does not start at 0 and end at the sequence count"
            )
        for start in range(0, docs.size - 1, _CHUNK):
            steps = np.diff(docs[start : start + _CHUNK + 1])
            if steps.min() < 0:
                raise _corrupt(
                    ipath,
                    f"document index decreases at document {start + int(np.argmax(steps < 0))}",
                )
        return pointer

    # -- sizes -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sequence_lengths.size

    @property
    def num_documents(self) -> int:
        return self.document_indices.size - 1

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (int64), summing its sequences; computed once (read-only)."""
        if self._document_lengths is None:
            cum = np.zeros(len(self) + 1, dtype=np.int64)
            np.cumsum(self.sequence_lengths, out=cum[1:])
            lengths = cum[self.document_indices[1:]] - cum[self.document_indices[:-1]]
            lengths.flags.writeable = False
            self._document_lengths = lengths
        return self._document_lengths

    # -- access ------------------------------------------------------------------------
    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence ``i`` (a read-only view), optionally a slice of it."""
        if not -len(self) <= i < len(self):
            raise IndexError(
                f"sequence {i} out of range for {len(self)} sequences in {self.prefix}"
            )
        size = int(self.sequence_lengths[i])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"slice [{offset}, {offset + length}) outside sequence {i} of {size} tokens"
            )
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]

    __getitem__ = get

    def document(self, d: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of document ``d`` (its sequences are contiguous in the .bin), or a slice of it."""
        if not 0 <= d < self.num_documents:
            raise IndexError(
                f"document {d} out of range for {self.num_documents} documents in {self.prefix}"
            )
        first, end = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if first == end:
            return self._bin[:0]
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        size = (
            int(self.sequence_pointers[end - 1]) // self.dtype.itemsize
            + int(self.sequence_lengths[end - 1])
            - start
        )
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"slice [{offset}, {offset + length}) outside document {d} of {size} tokens"
            )
        return self._bin[start + offset : start + offset + length]

    def fingerprint(self) -> str:
        """Identity of the contents, cheap at any size: counts plus a hash of the index's ends.

        Sample-index caches are keyed by it, so a rebuilt corpus never reuses a stale cache.
        """
        if self._fingerprint is not None:
            return self._fingerprint
        import hashlib

        h = hashlib.sha1(
            f"{self.dtype}-{len(self)}-{self.num_documents}-{self.num_tokens}".encode()
        )
        head = self._idx[: 1 << 20]
        tail = self._idx[max(len(self._idx) - (1 << 20), 0) :]
        h.update(head.tobytes())
        h.update(tail.tobytes())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def token_range(self) -> tuple[int, int]:
        """(smallest, largest) token id in the .bin; one pass over the memory map, then kept."""
        if self._token_range is None:
            if self.num_tokens == 0:
                self._token_range = (0, -1)
            else:
                lo = (
                    0
                    if self.dtype.kind == "u"
                    else min(
                        int(self._bin[s : s + (1 << 26)].min())
                        for s in range(0, self.num_tokens, 1 << 26)
                    )
                )
                hi = max(
                    int(self._bin[s : s + (1 << 26)].max())
                    for s in range(0, self.num_tokens, 1 << 26)
                )
                self._token_range = (lo, hi)
        return self._token_range

    def close(self) -> None:
        """Drop the memory maps (they unmap once no returned view still uses them)."""
        self._bin = self._idx = None

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}: {self.num_documents} documents, {len(self)} sequences, "
            f"{self.num_tokens} {self.dtype} tokens)"
        )


def merge_datasets(prefixes: list, output_prefix, overwrite: bool = False) -> IndexedDataset:
    """Concatenate datasets (same dtype) into one, in the given order."""
    if not prefixes:
        raise ValueError("nothing to merge: give at least one input prefix")
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetWriter(output_prefix, dtype, overwrite=overwrite) as writer:
        for prefix in prefixes:
            writer.add_dataset(prefix)
    return IndexedDataset(output_prefix)
