"""glm-preprocess throughput beside its ceiling and a Megatron-style baseline, in one run.

- ceiling: the tokenizer's raw encode rate on the same documents, already parsed and in
  memory, spread over the same number of worker processes, with the call glm-preprocess
  makes (``encode_arrays``: sentencepiece's ids as buffers, no Python int per token);
- baseline: what Megatron-LM's tools/preprocess_data.py does: ``Pool.imap(encode, lines,
  32)`` where each call parses one JSON line and encodes one document, one writer;
- ours: the ``glm-preprocess`` CLI as users run it.

Peak RSS is sampled over the whole process tree (main + workers). Run:
``python benchmarks/preprocess.py --mb 100 --workers 2`` (the corpus is the standard library's
docstrings, repeated to the requested size; the tokenizer a sentencepiece BPE of 16,000 pieces
trained on it, as in issue 17's measurement; ``--model-type unigram --vocab-size 8000`` gives
a tokenizer that encodes about 3.5x faster, so every other cost weighs 3.5x more).

CPU time is the figure that the encode ceiling bounds: the least of ``--cpu-repeats`` runs of
each, taking turns, since a noisy machine moves single runs by 10% or more.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from megatron_glm.data.indexed import IndexedDatasetWriter, best_dtype
from megatron_glm.data.tokenizer import load_tokenizer
from megatron_glm.data_prep.stdlib_corpus import write_corpus
from megatron_glm.data_prep.train_tokenizer import train_tokenizer


class PeakRSS:
    """Samples the summed RSS of a process and its children every 20 ms."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(
                    self.peak, sum(p.memory_info().rss for p in procs if p.is_running())
                )
            except psutil.Error:
                pass
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return self.peak


def make_corpus(folder: str, megabytes: int) -> str:
    base = os.path.join(folder, "stdlib.jsonl")
    write_corpus(base)
    data = open(base, "rb").read()
    path = os.path.join(folder, f"corpus_{megabytes}mb.jsonl")
    with open(path, "wb") as f:
        written = 0
        while written < megabytes * 1e6:
            f.write(data)
            written += len(data)
    return path


# -- ceiling -------------------------------------------------------------------------------
_TOK = None


def _load(model):
    global _TOK
    _TOK = load_tokenizer(model=model)


def _encode_texts(texts):
    cpu = time.process_time()
    tokens = sum(map(len, _TOK.encode_arrays(texts)))
    return tokens, time.process_time() - cpu


def ceiling(model, path, workers, max_docs=400_000):
    with open(path, "rb") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(max_docs), f)]
    chunks = [texts[i : i + 2000] for i in range(0, len(texts), 2000)]
    nbytes = sum(len(t.encode()) for t in texts)
    with mp.get_context("fork").Pool(workers, initializer=_load, initargs=(model,)) as pool:
        pool.map(_encode_texts, chunks[:workers])  # warm up
        start = time.perf_counter()
        results = pool.map(_encode_texts, chunks)
        seconds = time.perf_counter() - start
    tokens, cpu = sum(r[0] for r in results), sum(r[1] for r in results)
    return {
        "tokens_per_s": tokens / seconds,
        "text_mb_per_s": nbytes / seconds / 1e6,
        "cpu_s": cpu,
        "tokens": tokens,
    }


# -- baseline: Megatron-LM's preprocess_data.py structure ----------------------------------
def _megatron_style_encode(line):
    doc = json.loads(line)
    ids = _TOK.encode(doc["text"])
    if ids:
        ids.append(_TOK.eod_id)
    return ids, len(line)


def megatron_style(model, path, out_prefix, workers):
    start = time.perf_counter()
    tok = load_tokenizer(model=model)
    dtype = best_dtype(tok.vocab_size)
    tokens = 0
    with (
        open(path, "rb") as fin,
        IndexedDatasetWriter(out_prefix, dtype, overwrite=True) as writer,
        mp.get_context("fork").Pool(workers, initializer=_load, initargs=(model,)) as pool,
    ):
        for ids, _ in pool.imap(_megatron_style_encode, fin, 32):
            if ids:
                writer.add_document(np.asarray(ids, dtype=dtype))
                tokens += len(ids)
    return tokens, time.perf_counter() - start


def _run_baseline(model, path, out_prefix, workers, result_path):
    tokens, seconds = megatron_style(model, path, out_prefix, workers)
    with open(result_path, "w") as f:
        json.dump({"tokens": tokens, "seconds": seconds}, f)


def measure_baseline(model, path, out_prefix, workers, tmp):
    result = os.path.join(tmp, "baseline.json")
    code = (
        "import sys; sys.path.insert(0, %r); import preprocess as b; b._run_baseline(%r, %r, %r, %d, %r)"
        % (os.path.dirname(os.path.abspath(__file__)), model, path, out_prefix, workers, result)
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    rss = PeakRSS(proc.pid)
    proc.wait()
    peak = rss.stop()
    r = json.load(open(result))
    return {
        "tokens_per_s": r["tokens"] / r["seconds"],
        "mb_per_s": os.path.getsize(path) / r["seconds"] / 1e6,
        "seconds": r["seconds"],
        "peak_rss_mb": peak / 2**20,
    }


def measure_ours(model, path, out_prefix, workers):
    cmd = [
        sys.executable,
        "-m",
        "megatron_glm.data_prep.preprocess",
        "--input",
        path,
        "--output-prefix",
        out_prefix,
        "--tokenizer-model",
        model,
        "--workers",
        str(workers),
        "--append-eod",
        "--overwrite",
        "--no-progress",
    ]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    rss = PeakRSS(proc.pid)
    out = proc.communicate()[0]
    seconds = time.perf_counter() - start
    # the CLI and its workers (it waits for them)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    peak = rss.stop()
    if proc.returncode:
        raise SystemExit(f"glm-preprocess failed:\n{out}")
    meta = json.load(open(out_prefix + "_text_document.meta.json"))
    # the CLI's own account: CPU seconds in the tokenizer's encode calls, of the run's (after start-up)
    found = re.search(r"the tokenizer took ([\d.,]+) of ([\d.,]+) CPU", out).groups()
    encode, run = (float(x.replace(",", "")) for x in found)
    return {
        "tokens_per_s": meta["tokens"] / seconds,
        "mb_per_s": os.path.getsize(path) / seconds / 1e6,
        "seconds": seconds,
        "peak_rss_mb": peak / 2**20,
        "tokens": meta["tokens"],
        "cpu_s": cpu,
        "share": encode / run,
    }


def startup_seconds() -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "megatron_glm.data_prep.preprocess", "--help"],
            check=True,
            capture_output=True,
        )
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--vocab-size", type=int, default=16000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder)")
    p.add_argument(
        "--skip-baseline", action="store_true", help="only ours (for the large-corpus memory run)"
    )
    p.add_argument(
        "--cpu-repeats",
        type=int,
        default=5,
        help="runs of ours and of the raw encode for the CPU times",
    )
    args = p.parse_args()
    tmp = args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-")
    os.makedirs(tmp, exist_ok=True)
    corpus = make_corpus(tmp, args.mb)
    model = train_tokenizer(
        [os.path.join(tmp, "stdlib.jsonl")],
        os.path.join(tmp, f"spm_{args.model_type}"),
        args.vocab_size,
        model_type=args.model_type,
        overwrite=True,
    )
    print(
        f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}"
    )
    print(
        f"corpus: {os.path.getsize(corpus) / 1e6:,.0f} MB JSONL (stdlib docstrings), sentencepiece "
        f"{args.model_type} {args.vocab_size}, workers {args.workers}"
    )
    ours = measure_ours(model, corpus, os.path.join(tmp, "ours"), args.workers)
    print(
        f"ours      : {ours['tokens_per_s'] / 1e6:6.2f} M tok/s  {ours['mb_per_s']:6.1f} MB/s  "
        f"{ours['seconds']:6.1f} s  peak RSS {ours['peak_rss_mb']:,.0f} MB ({ours['tokens']:,} tokens)"
    )
    print(f"start-up  : glm-preprocess --help in {startup_seconds():.2f} s")
    if args.skip_baseline:
        return
    ceil = ceiling(model, corpus, args.workers, max_docs=10**9)
    print(
        f"ceiling   : {ceil['tokens_per_s'] / 1e6:6.2f} M tok/s (raw encode of parsed text in memory)"
    )
    # CPU time, alternating the two so that a busy moment hits both; the least of each counts
    runs, cpu_ceil = [ours], [ceil["cpu_s"]]
    for _ in range(args.cpu_repeats - 1):
        runs.append(measure_ours(model, corpus, os.path.join(tmp, "ours"), args.workers))
        cpu_ceil.append(ceiling(model, corpus, args.workers, max_docs=10**9)["cpu_s"])
    cpu_ours, shares = [r["cpu_s"] for r in runs], sorted(r["share"] for r in runs)
    print(
        f"CPU time  : ours {min(cpu_ours):.2f} s (everything: start-up, reading, parsing, encoding, writing, "
        f"all processes), raw encode {min(cpu_ceil):.2f} s, least of {args.cpu_repeats} each: "
        f"encode/ours {min(cpu_ceil) / min(cpu_ours):.2f}"
    )
    print(
        f"in-run    : the tokenizer's encode calls took {shares[len(shares) // 2]:.1%} of each run's CPU after "
        f"start-up (median of {len(shares)}; {shares[0]:.1%} to {shares[-1]:.1%}): the same moment of the "
        "machine for both, so it moves less than the ratio of two runs"
    )
    base = measure_baseline(model, corpus, os.path.join(tmp, "baseline"), args.workers, tmp)
    print(
        f"baseline  : {base['tokens_per_s'] / 1e6:6.2f} M tok/s  {base['mb_per_s']:6.1f} MB/s  "
        f"{base['seconds']:6.1f} s  peak RSS {base['peak_rss_mb']:,.0f} MB (Megatron-style Pool.imap)"
    )
    print(
        f"ratios    : ours/ceiling {ours['tokens_per_s'] / ceil['tokens_per_s']:.2f}  "
        f"ours/baseline {ours['tokens_per_s'] / base['tokens_per_s']:.2f}"
    )
    same = (
        open(os.path.join(tmp, "ours_text_document.bin"), "rb").read()
        == open(os.path.join(tmp, "baseline.bin"), "rb").read()
    )
    print(
        f"check     : ours and baseline wrote {'identical' if same else 'DIFFERENT'} token streams"
    )


if __name__ == "__main__":
    main()
