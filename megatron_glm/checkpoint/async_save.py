"""``--async-save``: a checkpoint is copied to host memory, then written by a background thread.

The training loop stops only for the host copy. The writer thread then writes every file
into the staging folder, agrees with the other ranks that all of theirs are there (on a gloo
group of its own, so it never interleaves with training's collectives), and rank 0 publishes
the checkpoint exactly as a synchronous save does: rename into place, then ``latest``. At
most one save is in flight: the next save, and the end of the run, wait for it.

DeepSpeed's decoupled checkpoint engine does the same for GPUs, but it needs DeepSpeed's
compiled I/O op and writes DeepSpeed's ``latest`` itself, outside the staging and rename
that make a kill at any moment safe here.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import OrderedDict

import torch

logger = logging.getLogger(__name__)


def to_host(obj):
    """A copy of ``obj`` that training can no longer change: tensors copied to host memory, the rest deep-copied.

    A GPU tensor's copy is queued (pinned memory, non-blocking); ``host_copies_done`` waits for them.
    """
    if torch.is_tensor(obj):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        return torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True).copy_(
            obj.detach(), non_blocking=True
        )
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, to_host(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(to_host(v) for v in obj)
    return copy.deepcopy(obj)


def host_copies_done() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class HostCopyEngine:
    """DeepSpeed's checkpoint engine during an async save: ``save`` keeps a host copy instead of writing."""

    def __init__(self, inner):
        self.inner, self.files = inner, []

    def save(self, state_dict, path: str) -> None:
        self.files.append((path, to_host(state_dict)))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def create(self, info) -> None:
        pass

    def commit(self, info) -> bool:
        return True

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return False  # the host copy is compact already: DeepSpeed need not clone views first

    def __getattr__(self, name):
        return getattr(self.inner, name)


def lower_priority() -> None:
    """The calling thread yields the CPU to training's threads (Linux: a thread's own nice value).

    Writing is CPU work (serialisation, checksums); at the default priority it takes cores from
    the step it runs beside, which on a CPU-bound run stalls training about as long as a
    synchronous save would. Niced, it runs in the step's idle moments instead.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the default priority
        pass


class BackgroundWriter:
    """One save in flight at a time, written by a thread; its failure is raised at the next ``wait``."""

    def __init__(self):
        import torch.distributed as dist

        # a group of the writer threads' own: collectives from two threads must not share one
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def all_ok(self, ok: bool) -> bool:
        """Whether every rank's writer succeeded (also the barrier before rank 0 publishes)."""
        if self.group is None:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def submit(self, job, name: str) -> None:
        self.wait()

        def run():
            started = time.perf_counter()
            lower_priority()
            try:
                job()
                logger.info(
                    f"saved {name} in the background ({time.perf_counter() - started:.1f} s)"
                )
            except BaseException as e:  # raised in the training thread at the next wait
                self._error = e

        self._thread = threading.Thread(target=run, name="megatron-glm-async-save", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
