"""Micro-batches from background workers: ``torch.utils.data.DataLoader`` over the pretraining sampler.

Each item the loader fetches is one micro-batch: the sampler's list of global sample indices,
read and collated (blank infilling) inside a worker process, so the step does not wait for
the collator. Every sample's randomness comes from ``(seed, sample index)`` alone, and the
loader keeps the sampler's order, so the batches are bitwise the same for any number of
workers, and a run resumed at ``consumed_samples`` (the loader's position, in the checkpoint)
reads exactly what an uninterrupted one would.

A sample that cannot be read or collated comes back as an error record naming its index, and
the main process stops with that message; a worker that dies (killed, out of memory) stops the
run with the samples the step was waiting for, rather than hanging it.
"""

from __future__ import annotations

import os
import signal
import time

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from megatron_glm import faults

_ERROR = "__error__"


class DataError(RuntimeError):
    """A sample that cannot be turned into a batch, or a loader worker that died."""


class HostBatch:
    """A micro-batch a worker made, as numpy arrays: pickled by value through the loader's queue.

    A torch tensor would cross as a shared-memory file descriptor fetched from the worker, one
    per tensor: 3.6 ms for a micro-batch of 8 x 512 tokens against 1.1 ms by value (the collator
    itself takes about 3 ms). Not a Mapping, so that the loader's pinning thread calls
    ``pin_memory`` here, off the step's path.
    """

    def __init__(self, batch: dict):
        self.arrays = {k: v.numpy() for k, v in batch.items()}

    def tensors(self) -> dict:
        return {k: torch.from_numpy(v) for k, v in self.arrays.items()}

    def pin_memory(self, device=None) -> dict:
        return {k: v.pin_memory() for k, v in self.tensors().items()}


class MicroBatches(Dataset):
    """``dataset[indices]``: the collated micro-batch of those sample indices (a plain dict of tensors)."""

    def __init__(self, dataset, collate, vocab_size: int | None = None):
        self.dataset, self.collate, self.vocab_size = dataset, collate, vocab_size
        # shared with the workers: the sample each one is on (BatchStream sets it)
        self.progress = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices):
        index = indices[0]
        try:
            samples = []
            worker = get_worker_info()
            for index in indices:
                if worker is not None and self.progress is not None:
                    self.progress[worker.id] = index
                if faults.worker_crash_at(index) and worker is not None:
                    os.kill(os.getpid(), signal.SIGKILL)
                samples.append((index, self.dataset[index]))
            batch = self.collate(samples)
        except Exception as e:  # noqa: BLE001 - any failure becomes a message that names the sample
            return {_ERROR: f"sample {index}: {type(e).__name__}: {e}"}
        if self.vocab_size is not None:
            top = int(batch["tokens"].max())
            if top >= self.vocab_size:
                row = int((batch["tokens"] >= self.vocab_size).any(dim=1).nonzero()[0])
                return {
                    _ERROR: f"sample {indices[row]}: token id {top} is outside the model's vocabulary of "
                    f"{self.vocab_size}: the data was tokenized with another tokenizer, or changed"
                }
        return HostBatch(batch) if worker is not None else batch


def _as_is(batch):
    return batch


def _worker_init(_worker_id: int) -> None:
    """Leave stop signals to the training process: Slurm and Ctrl-C signal every process of the job, and a
    worker that died of one would end the run before the trainer's checkpoint-and-stop."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


class BatchStream:
    """This rank's micro-batches in order, with the seconds each ``next`` waited for its batch."""

    def __init__(
        self,
        batches: MicroBatches,
        sampler,
        num_workers: int,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ):
        if num_workers < 0:
            raise ValueError(
                f"--num-workers {num_workers}: use 0 (collate in the training process) or more"
            )
        self.progress = torch.full((max(num_workers, 1),), -1, dtype=torch.int64).share_memory_()
        batches.progress = self.progress
        self.loader = DataLoader(
            batches,
            sampler=sampler,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=_worker_init,
            prefetch_factor=prefetch_factor if num_workers else None,
            # the loader draws its workers' base seed from this, not from torch's default
            # generator, whose state is the training's (dropout) and is checkpointed
            generator=torch.Generator().manual_seed(0),
        )
        # the loader's SIGCHLD handler would raise a dead worker's error wherever the trainer happens to be;
        # without it the error comes from the wait for a batch (within seconds), where it can name the samples
        previous = signal.getsignal(signal.SIGCHLD)
        self._batches = iter(self.loader)
        signal.signal(signal.SIGCHLD, previous)
        self._expected = iter(sampler)  # the same order again: names the samples a lost batch held

    def next(self) -> tuple[dict, float]:
        indices = next(self._expected)
        start = time.perf_counter()
        try:
            batch = next(self._batches)
        except (
            RuntimeError
        ) as e:  # a worker died (the loader notices within seconds), or the loader failed
            dead = self._where_workers_died()
            if dead is None:
                raise DataError(
                    f"the data loader failed waiting for samples {indices[0]}..{indices[-1]}: {e}"
                ) from None
            raise DataError(
                f"a data-loader worker died {dead} ({e}); run with --num-workers 0 to see the failure "
                "in the training process, or check the node's memory"
            ) from None
        if isinstance(batch, HostBatch):  # not pinned (CPU training)
            batch = batch.tensors()
        return _checked(batch, indices), time.perf_counter() - start

    def _where_workers_died(self) -> str | None:
        """Where the dead workers were (the sample each was on), or None when every worker lives."""
        dead = [i for i, w in enumerate(getattr(self._batches, "_workers", [])) if not w.is_alive()]
        if not dead:
            return None
        samples = [int(self.progress[i]) for i in dead if self.progress[i] >= 0]
        return (
            f"reading or collating sample {', '.join(map(str, samples))}"
            if samples
            else "before reading a sample"
        )

    def close(self) -> None:
        """Stop the workers now (not at interpreter exit, after the process group is gone)."""
        shutdown = getattr(self._batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._batches = None


def _checked(batch: dict, indices) -> dict:
    """The batch, or ``DataError`` with the message its error record carries."""
    if _ERROR in batch:
        raise DataError(
            f"cannot build the micro-batch of samples {indices[0]}..{indices[-1]}: {batch[_ERROR]}"
        )
    return batch


def collate_now(batches: MicroBatches, indices) -> dict:
    """One micro-batch in this process (validation), with the same errors as the loader's."""
    return _checked(batches[indices], indices)
