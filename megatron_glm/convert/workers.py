"""glm-convert's jobs (one parameter, or one output file, each) run in this process or in ``--workers``.

A job is ``fn(work, *args)`` with ``fn`` a module-level function: ``work`` holds the source, opened
once per process from its ``opener``, and the output files that process has mapped. Workers are
spawned, not forked: a forked copy of a process that has run torch's thread pools can hang.
"""

from __future__ import annotations

import multiprocessing

from tqdm import tqdm

from megatron_glm.checkpoint.mapped import MappedFile


class Work:
    """What a process's jobs share: the source, and the output files it writes into (mapped once)."""

    def __init__(self, source):
        self.source = source
        self._outputs: dict[str, MappedFile] = {}

    def output(self, path: str) -> MappedFile:
        if path not in self._outputs:
            self._outputs[path] = MappedFile(path, writable=True)
        return self._outputs[path]

    def close(self) -> None:
        self._outputs.clear()  # unmapped with their tensors


_work: list[Work] = []


def _open(opener: tuple) -> None:
    _work.append(Work(opener[0](*opener[1:])))


def _run(job) -> None:
    fn, args = job
    fn(_work[0], *args)


def run_jobs(source, fn, jobs: list[tuple], workers: int, desc: str, unit: str) -> None:
    """``fn(work, *job)`` for every job, in ``workers`` processes (1: this one); the first error is raised."""
    progress = tqdm(total=len(jobs), desc=desc, unit=unit, disable=len(jobs) < 64)
    try:
        if workers > 1 and len(jobs) > 1 and source.opener is not None:
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(workers, len(jobs)), _open, (source.opener,)) as pool:
                for _ in pool.imap_unordered(_run, [(fn, job) for job in jobs]):
                    progress.update()
        else:
            work = Work(source)
            try:
                for job in jobs:
                    fn(work, *job)
                    progress.update()
            finally:
                work.close()
    finally:
        progress.close()
