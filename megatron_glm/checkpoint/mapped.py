"""A checkpoint file memory-mapped, whose pages go back to the kernel as soon as a tensor is done with.

A page of a mapped file counts in the process's memory from its first touch until the file is
unmapped, so a reader or writer that walks a whole checkpoint tensor by tensor would end up
holding all of it. ``MappedFile`` hands back the pages of each tensor once it is copied out (or,
written in place, once it is filled): clean pages are dropped and read again if touched, dirty
pages of a shared mapping stay in the page cache and reach the file as any write would.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch

from megatron_glm import serialization
from megatron_glm.checkpoint.format import CheckpointError


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_MADV_DONTNEED = 4


class MappedFile:
    """A torch checkpoint file loaded memory-mapped (``value``), and the addresses it is mapped at.

    ``writable``: the mapping is shared, so ``fill`` writes through to the file (an output staged
    with its tensors' space reserved, see ``convert/writers.py``). Only addresses inside this file's
    own mapping are ever handed back.
    """

    def __init__(self, path: str, trust: bool = False, writable: bool = False):
        self.path = path
        if not os.path.exists(path):
            raise CheckpointError(
                f"{path} is missing: the checkpoint is incomplete (copy it whole, or resume an "
                "earlier iteration)"
            )
        if writable:  # written by us a moment ago: tensors only
            with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                self.value = torch.load(path, weights_only=True, mmap=True)
        else:
            self.value = serialization.load(path, trust=trust, mmap=True)
        if not isinstance(self.value, dict):
            raise CheckpointError(f"{path} is not a checkpoint file of ours or DeepSpeed's")
        self.ranges = []
        if _LIBC is not None:
            real = os.path.realpath(path)
            with open("/proc/self/maps") as f:
                for line in f:
                    if line.rstrip("\n").endswith(" " + real):
                        start, end = line.split()[0].split("-")
                        self.ranges.append((int(start, 16), int(end, 16)))

    def release(self, view: torch.Tensor) -> None:
        """Hand the pages under ``view`` (a tensor of this file) back to the kernel."""
        start = view.data_ptr()
        end = start + view.numel() * view.element_size()
        if view.numel() and any(a <= start and end <= b for a, b in self.ranges):
            first = start - start % mmap.PAGESIZE
            _LIBC.madvise(first, end - first, _MADV_DONTNEED)

    def copy(self, view: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """A copy of ``view`` (in ``dtype``; None keeps its own), its pages handed back."""
        out = view.to(dtype or view.dtype, copy=True)
        self.release(view)
        return out

    def fill(self, view: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``value`` into ``view`` (a tensor of this writable file) and hand its pages back."""
        view.copy_(value)
        self.release(view)
