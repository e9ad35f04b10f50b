"""Measured memory per rank: what ``glm-plan``'s estimates are checked against.

On CUDA it reads the caching allocator's counters (``memory_allocated`` and
``max_memory_allocated``). The CPU allocator keeps no counters, so there the PyTorch profiler
records every allocation and free (``profile_memory``) and the running sum gives the same
two figures. Both count tensor storage only, not allocator caching or fragmentation.

``mark()`` ends set-up (model, engine, optimizer buffers): the bytes live then are the static
model states, and the peak is taken from that point on, over the training steps.
"""

from __future__ import annotations

import json
import os

_MARK = "megatron_glm::setup_done"


class MemoryMeter:
    def __init__(self, device: str):
        import torch

        self.device = device
        self.profiler = None
        self.static = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profiler.__enter__()

    def mark(self) -> None:
        """Set-up is over: remember the live bytes; the peak counts from here."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.static = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:  # an annotation in the profile: the allocations after it count towards the peak
            with torch.profiler.record_function(_MARK):
                pass

    def finish(self) -> dict:
        """``{"static_bytes", "peak_bytes", "device"}``; stops the profiler on CPU."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return {"static_bytes": self.static, "peak_bytes": torch.cuda.max_memory_allocated(), "device": "cuda"}
        self.profiler.__exit__(None, None, None)
        results = self.profiler.profiler.kineto_results.events()
        mark_ns = min((e.start_ns() for e in results if e.name() == _MARK), default=None)
        events = sorted((e for e in results if e.name() == "[memory]"), key=lambda e: e.start_ns())
        live, static, peak = 0, None, 0
        for e in events:
            if static is None and mark_ns is not None and e.start_ns() >= mark_ns:
                static = peak = live
            live += e.nbytes()
            if static is not None:
                peak = max(peak, live)
        if static is None:
            static = peak = live
        return {"static_bytes": static, "peak_bytes": peak, "device": "cpu"}


def write_report(folder: str, rank: int, report: dict, extra: dict) -> str:
    path = os.path.join(folder, f"memory_rank{rank}.json")
    with open(path, "w") as f:
        json.dump({**report, **extra}, f, indent=1)
    return path
