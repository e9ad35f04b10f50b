"""glm-preprocess: JSONL corpora -> Megatron indexed datasets ``{prefix}_{key}_document.bin/.idx``.

The main process reads raw lines and writes; workers decode, parse and tokenize batches of
about a megabyte. At most ``4 x workers`` batches are in flight and results are consumed in
submission order, so memory is bounded whatever the corpus size and the output is
byte-identical whatever the worker count. Nothing appears under the output names before
the run has finished (see ``IndexedDatasetWriter``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from megatron_glm.data_prep.jsonl import (
    SKIP_CAUSES,
    CorpusError,
    expand_inputs,
    iter_line_batches,
    parse_lines,
    shard,
)

MAX_REPORTED = 5  # file:line examples listed in the summary


class PreprocessError(RuntimeError):
    """A run that stops (``--strict`` on a bad line, unusable inputs); nothing is written."""


@dataclass
class Encoded:
    """What a worker returns for one batch of lines."""

    path: str
    docs: int
    skips: list  # (line number, cause)
    tokens: list  # per json key: (flat tokens, sequence lengths, sequences per document or None: one each)
    raw_bytes: int
    encode_cpu: float = 0.0  # CPU seconds this batch spent in the tokenizer's encode call


# -- worker side -------------------------------------------------------------------------
_WORKER: dict = {}
_MAIN_PID: int | None = None  # the process that forks the workers (they inherit it)


def _die_with_parent() -> None:
    """On Linux, a worker is killed when the main process dies (even by SIGKILL): no orphans.

    A main process killed between the fork and the ``prctl`` would never send the signal, so the
    worker then checks that its parent is still the main process.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers exit when their task queue closes
        return
    if _MAIN_PID is not None and os.getppid() != _MAIN_PID:
        os._exit(1)


def _init_worker(spec, keys, append_eod, dtype, sentences=None, in_subprocess=True) -> None:
    """``sentences``: None, or ``(lang, keep_newlines)`` to split documents into sentences."""
    from megatron_glm.data.tokenizer import GLMTokenizer

    if in_subprocess:  # the main process alone handles Ctrl-C and SIGTERM, and stops the workers
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent()

    tok = GLMTokenizer(spec)
    splitter = None
    if sentences is not None:
        from megatron_glm.data_prep.sentences import load_splitter

        splitter = load_splitter(*sentences)
    _WORKER.update(
        tok=tok, keys=keys, eod=tok.eod_id if append_eod else None, dtype=dtype, splitter=splitter
    )


def _encode_one(tok, text):
    try:
        return tok.encode_arrays([text])[0]
    except (UnicodeError, RuntimeError, TypeError):
        return None


def _encode_column(tok, texts, splitter):
    """Token ids (an array) per text, None where it cannot be encoded; with ``splitter``, per text the list of its
    sentences' ids (empty ones left out)."""
    if splitter is None:
        try:
            return tok.encode_arrays(texts)
        except (UnicodeError, RuntimeError, TypeError):  # e.g. a lone surrogate: find the culprit
            return [_encode_one(tok, text) for text in texts]
    from megatron_glm.data_prep.sentences import split

    sentences = [split(splitter, text) for text in texts]
    try:
        ids = iter(tok.encode_arrays([s for doc in sentences for s in doc]))
        return [[s for s in (next(ids) for _ in doc) if s.size] for doc in sentences]
    except (UnicodeError, RuntimeError, TypeError):  # find the culprit document
        out = []
        for doc in sentences:
            encoded = [_encode_one(tok, s) for s in doc]
            out.append(None if any(s is None for s in encoded) else [s for s in encoded if s.size])
        return out


def encode_lines(batch) -> Encoded:
    """Decode, parse and tokenize one batch; the verdict of every line is kept in order."""
    import numpy as np

    tok, keys, eod, dtype = _WORKER["tok"], _WORKER["keys"], _WORKER["eod"], _WORKER["dtype"]
    kept_lines, columns, skips = parse_lines(batch.lines, batch.first_line, keys)
    splitter = _WORKER.get("splitter")
    cpu = time.process_time()
    encoded = [_encode_column(tok, column, splitter) for column in columns]
    cpu = time.process_time() - cpu
    # a document is kept if every key encoded (not None) to something (ids, or sentences)
    sizes = np.array(
        [[-1 if ids is None else len(ids) for ids in col] for col in encoded], np.int64
    )
    sizes = sizes.reshape(len(keys), len(kept_lines))
    ok = (sizes > 0).all(axis=0)
    if not ok.all():
        for i in np.flatnonzero(~ok).tolist():
            skips.append((kept_lines[i], "invalid-utf8" if (sizes[:, i] < 0).any() else "empty"))
        skips.sort()
        keep = np.flatnonzero(ok).tolist()
        encoded = [[col[i] for i in keep] for col in encoded]
    tokens = []
    for docs, size in zip(encoded, sizes[:, ok]):
        if splitter is None:  # one sequence per document
            seqs, per_doc, lengths = docs, None, size
        else:  # a document is its list of (non-empty) sentences
            seqs, per_doc = [s for doc in docs for s in doc], size
            lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        flat = np.concatenate(seqs).astype(dtype, copy=False) if seqs else np.zeros(0, dtype)
        if eod is not None:  # after each document's last sequence
            last = np.arange(lengths.size) if per_doc is None else np.cumsum(per_doc) - 1
            flat = np.insert(flat, np.cumsum(lengths)[last], eod)
            lengths[last] += 1
        tokens.append((flat, lengths, per_doc))
    return Encoded(batch.path, int(ok.sum()), skips, tokens, batch.raw_bytes, cpu)


# -- main side ---------------------------------------------------------------------------
@dataclass
class Summary:
    files: int = 0
    docs: int = 0
    tokens: int = 0
    raw_bytes: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: list = field(default_factory=list)  # "file:line: cause"
    seconds: float = 0.0
    outputs: list = field(default_factory=list)
    encode_cpu: float = 0.0  # CPU seconds in the tokenizer's encode calls, all workers
    cpu: float = 0.0  # CPU seconds of the whole run: this process, its threads and its workers

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (
            f"{self.docs:,} documents, {self.tokens:,} tokens from {self.files} file(s) "
            f"({self.raw_bytes / 1e6:,.1f} MB) in {self.seconds:.1f} s: "
            f"{self.docs / s:,.0f} docs/s, {self.tokens / s / 1e6:,.2f} M tokens/s, "
            f"{self.raw_bytes / s / 1e6:,.1f} MB/s; the tokenizer took {self.encode_cpu:,.1f} "
            f"of {self.cpu:,.1f} CPU seconds ({self.encode_cpu / max(self.cpu, 1e-9):.0%})"
        )


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children that have been waited for."""
    import resource

    return sum(
        r.ru_utime + r.ru_stime
        for r in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def _ordered_map(fn, items, workers: int, initargs):
    """Like ``Pool.imap`` but with at most ``4 x workers`` tasks in flight (bounded memory).

    A worker that dies (out of memory, a crash in a tokenizer) raises ``BrokenProcessPool``
    here instead of hanging the run.
    """
    if workers <= 1:
        _init_worker(*initargs, in_subprocess=False)
        yield from map(fn, items)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    pool = ProcessPoolExecutor(
        workers, mp_context=mp.get_context("fork"), initializer=_init_worker, initargs=initargs
    )
    try:
        window = collections.deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """tqdm on a terminal, a log line every ``interval`` seconds otherwise."""

    def __init__(self, total_bytes: int, enabled: bool, interval: float):
        self.total, self.interval, self.start = total_bytes, interval, time.monotonic()
        self.last_log = self.start
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                smoothing=0.1,
                desc="glm-preprocess",
                file=sys.stderr,
            )

    def update(self, summary: Summary, raw_bytes: int) -> None:
        now = time.monotonic()
        rate = max(now - self.start, 1e-9)
        stats = f"{summary.docs / rate:,.0f} docs/s, {summary.tokens / rate / 1e6:.2f} M tok/s"
        if self.bar is not None:
            self.bar.update(raw_bytes)
            self.bar.set_postfix_str(stats, refresh=False)
        elif self.enabled and now - self.last_log >= self.interval:
            self.last_log = now
            pct = 100.0 * summary.raw_bytes / max(self.total, 1)
            print(
                f"glm-preprocess: {pct:5.1f}% {summary.raw_bytes / 1e6:,.0f} MB, {stats}, "
                f"{summary.raw_bytes / rate / 1e6:.1f} MB/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def output_prefix(
    prefix: str, key: str, shard_of: tuple[int, int] | None = None, level: str = "document"
) -> str:
    """Megatron's naming, ``{prefix}_{key}_{level}`` (level: document, or sentence with --split-sentences);
    shard I of N adds ``.shard-{I}-of-{N}`` (zero-padded: the names sort in shard order)."""
    name = f"{prefix}_{key}_{level}"
    if shard_of is not None:
        index, count = shard_of
        width = max(5, len(str(count - 1)))
        name += f".shard-{index:0{width}d}-of-{count:0{width}d}"
    return name


def preprocess(
    inputs,
    output_prefix_: str,
    spec,
    json_keys=("text",),
    append_eod: bool = False,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    log_interval: float = 10.0,
    batch_bytes: int = 1 << 20,
    allow_empty: bool = False,
    shard_of: tuple[int, int] | None = None,
    split_sentences: bool = False,
    keep_newlines: bool = False,
    lang: str = "english",
) -> Summary:
    """Run the whole conversion; raises ``PreprocessError`` (nothing written) on a stop.

    ``shard_of=(I, N)`` converts only shard I of N (``jsonl.shard``); glm-merge-datasets joins the
    N outputs, in order, into exactly what one run over everything writes.
    """
    import numpy as np

    from megatron_glm.data.indexed import IndexedDatasetWriter, best_dtype, bin_path, idx_path
    from megatron_glm.data.tokenizer import GLMTokenizer

    spec = spec.resolved()
    json_keys = list(json_keys)
    if len(set(json_keys)) != len(json_keys):
        raise PreprocessError(f"--json-keys repeats a key: {json_keys}")
    prefixes = {
        key: output_prefix(
            output_prefix_, key, shard_of, "sentence" if split_sentences else "document"
        )
        for key in json_keys
    }
    sentences = None
    if split_sentences:
        from megatron_glm.data_prep.sentences import SentenceSplitError, load_splitter

        try:
            # fail (or warn) here, once, not in every worker
            load_splitter(lang, keep_newlines, warn=True)
        except SentenceSplitError as e:
            raise PreprocessError(str(e)) from e
        sentences = (lang, keep_newlines)
    elif keep_newlines:
        raise PreprocessError("--keep-newlines only means something with --split-sentences")
    if not overwrite:
        existing = [
            p
            for pre in prefixes.values()
            for p in (bin_path(pre), idx_path(pre))
            if os.path.exists(p)
        ]
        if existing:
            raise PreprocessError(
                f"{', '.join(existing)} already exist(s); pass --overwrite to replace"
            )
    try:
        paths = expand_inputs(inputs)
        pieces = paths if shard_of is None else shard(paths, *shard_of)
    except CorpusError as e:
        raise PreprocessError(str(e)) from e
    tok = GLMTokenizer(spec)
    dtype = best_dtype(tok.vocab_size)
    summary = Summary(files=len(pieces))
    bar = _Progress(sum(os.path.getsize(p) for p in paths), progress, log_interval)
    start, cpu_start = time.monotonic(), _cpu_seconds()
    writers = {
        key: IndexedDatasetWriter(prefixes[key], dtype, overwrite=overwrite) for key in json_keys
    }
    meta_tmp = {key: f"{prefixes[key]}.meta.json.tmp-{os.getpid()}" for key in json_keys}
    try:
        results = _ordered_map(
            encode_lines,
            iter_line_batches(pieces, batch_bytes),
            workers,
            (spec, json_keys, append_eod, dtype, sentences),
        )
        for res in results:
            for number, cause in res.skips:
                where = f"{res.path}:{number}: {cause}"
                if strict:
                    raise PreprocessError(
                        f"{where} (--strict stops at the first bad line; nothing was written)"
                    )
                summary.skipped[cause] += 1
                if len(summary.examples) < MAX_REPORTED:
                    summary.examples.append(where)
            for key, (flat, lengths, per_doc) in zip(json_keys, res.tokens):
                writers[key].add_documents(flat, lengths, per_doc)
            summary.docs += res.docs
            summary.tokens += int(res.tokens[0][0].size) if res.tokens else 0
            summary.raw_bytes += res.raw_bytes
            summary.encode_cpu += res.encode_cpu
            bar.update(summary, res.raw_bytes)
        summary.seconds = time.monotonic() - start
        summary.cpu = _cpu_seconds() - cpu_start  # the workers have exited: the pool is shut down
        # a shard may fall on blank lines only
        if summary.docs == 0 and not allow_empty and shard_of is None:
            causes = (
                ", ".join(f"{c} {n:,}" for c, n in summary.skipped.items() if n)
                or "the input is empty"
            )
            raise PreprocessError(
                f"no documents in {', '.join(paths)} ({causes}"
                + (f"; e.g. {summary.examples[0]}" if summary.examples else "")
                + f"); check --json-keys {' '.join(json_keys)}, or pass --allow-empty to write "
                "an empty dataset; nothing was written"
            )
        meta = {
            "inputs": [os.path.abspath(p) for p in paths],
            "json_keys": json_keys,
            "append_eod": append_eod,
            **(
                {"split_sentences": {"lang": lang, "keep_newlines": keep_newlines}}
                if split_sentences
                else {}
            ),
            **({"shard": list(shard_of)} if shard_of else {}),
            "documents": summary.docs,
            "skipped": dict(summary.skipped),
            "dtype": str(np.dtype(dtype)),
            "tokenizer": tok.describe(),
            "megatron_glm_version": __import__("megatron_glm").__version__,
        }
        for key, writer in writers.items():
            with open(meta_tmp[key], "w") as f:
                json.dump({**meta, "json_key": key, "tokens": writer.num_tokens}, f, indent=1)
            writer.finalize()
            os.replace(meta_tmp[key], prefixes[key] + ".meta.json")
            summary.outputs.append(prefixes[key])
    except CorpusError as e:  # an input that breaks off half-way (truncated .gz/.zst)
        for writer in writers.values():
            writer.abort()
        raise PreprocessError(f"{e}; nothing was written") from e
    except BaseException:
        for key, writer in writers.items():
            writer.abort()
            try:
                os.remove(meta_tmp[key])
            except OSError:
                pass
        raise
    finally:
        bar.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    from megatron_glm.data.tokenizer import add_tokenizer_args

    p = argparse.ArgumentParser(
        prog="glm-preprocess",
        allow_abbrev=False,
        description="Tokenize JSONL corpora (.jsonl, .jsonl.gz, .jsonl.zst; files, globs or folders) into "
        "Megatron indexed datasets {output-prefix}_{key}_document.bin/.idx.",
    )
    p.add_argument("--input", nargs="+", help="files, globs or folders")
    p.add_argument("--output-prefix")
    p.add_argument(
        "--verify",
        nargs="+",
        metavar="PREFIX",
        help="check existing datasets instead: the whole index, the .bin size, token ids against the "
        "vocabulary (the tokenizer flags, else the one recorded beside the data) and .meta.json",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="write a dataset even when no line gave a document",
    )
    p.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys to extract, one dataset each (default: text)",
    )
    p.add_argument(
        "--append-eod",
        action="store_true",
        help="append the end-of-document token to every document",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="tokenizer processes (default: all cores)",
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad line instead of skipping it"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument(
        "--split-sentences",
        action="store_true",
        help="one sequence per sentence (NLTK Punkt), documents kept in the document index; writes "
        "{prefix}_{key}_sentence (Megatron's naming)",
    )
    p.add_argument(
        "--keep-newlines",
        action="store_true",
        help="with --split-sentences: keep the whitespace (newlines too) after each sentence in it",
    )
    p.add_argument(
        "--lang", default="english", help="Punkt model for --split-sentences (default: english)"
    )
    p.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="accepted for Megatron command lines; it changes nothing here: --workers already "
        "parallelises one run, and the output keeps the input order (Megatron's "
        "--keep-sequential-samples). Across nodes, use --shard-index/--num-shards",
    )
    p.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="accepted for Megatron command lines; always the case here",
    )
    p.add_argument(
        "--shard-index",
        type=int,
        default=None,
        help="convert only this shard (0-based; e.g. $SLURM_ARRAY_TASK_ID) of --num-shards contiguous "
        "byte ranges of the inputs; writes {prefix}_{key}_document.shard-I-of-N. glm-merge-datasets "
        "joins the N shards, in order, into what one run writes",
    )
    p.add_argument("--num-shards", type=int, default=None)
    p.add_argument(
        "--log-interval",
        type=float,
        default=10.0,
        help="seconds between progress lines off a terminal",
    )
    add_tokenizer_args(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        from megatron_glm.data_prep.verify import main as verify

        return verify(args)
    if not args.input or not args.output_prefix:
        parser.error(
            "--input and --output-prefix are required (or --verify PREFIX to check a dataset)"
        )
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.partitions < 1:
        parser.error("--partitions must be at least 1")
    if (args.shard_index is None) != (args.num_shards is None):
        parser.error("--shard-index and --num-shards go together")
    if args.num_shards is not None and not 0 <= args.shard_index < args.num_shards:
        parser.error(
            f"--shard-index {args.shard_index} must be in 0..{args.num_shards - 1} for --num-shards "
            f"{args.num_shards}"
        )
    from concurrent.futures.process import BrokenProcessPool

    from megatron_glm.data.indexed import IndexedDatasetError
    from megatron_glm.data.tokenizer import TokenizerError, spec_from_args

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # clean up temporary files on kill, as on Ctrl-C
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        summary = preprocess(
            args.input,
            args.output_prefix,
            spec_from_args(args),
            args.json_keys,
            args.append_eod,
            args.workers,
            args.strict,
            args.overwrite,
            progress=not args.no_progress,
            log_interval=args.log_interval,
            allow_empty=args.allow_empty,
            shard_of=None if args.num_shards is None else (args.shard_index, args.num_shards),
            split_sentences=args.split_sentences,
            keep_newlines=args.keep_newlines,
            lang=args.lang,
        )
    except (
        PreprocessError,
        TokenizerError,
        CorpusError,
        FileExistsError,
        IndexedDatasetError,
    ) as e:
        print(f"glm-preprocess: error: {e}", file=sys.stderr)
        return 1
    except (
        OSError
    ) as e:  # a full disk, a vanished folder: the writers removed their temporary files
        print(
            f"glm-preprocess: error: writing failed ({e}); temporary files removed, nothing written",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "glm-preprocess: interrupted; temporary files removed, nothing written", file=sys.stderr
        )
        return 130
    except BrokenProcessPool as e:
        print(
            f"glm-preprocess: error: a worker process died ({e}); temporary files removed, nothing written. "
            "Lower --workers if memory is short",
            file=sys.stderr,
        )
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"glm-preprocess: {summary.line()}")
    if summary.skipped:
        causes = ", ".join(f"{c} {summary.skipped[c]:,}" for c in SKIP_CAUSES if summary.skipped[c])
        print(f"glm-preprocess: skipped {sum(summary.skipped.values()):,} line(s): {causes}")
        for example in summary.examples:
            print(f"  {example}")
    for prefix in summary.outputs:
        print(f"glm-preprocess: wrote {prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
