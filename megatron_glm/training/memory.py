"""Measured memory per rank: what ``glm-plan``'s estimates are checked against.

On CUDA it reads the caching allocator's counters (``memory_allocated`` and
``max_memory_allocated``). On CPU the PyTorch profiler records every allocation and free
(``profile_memory``), but only on the thread that runs it, while gloo's worker threads free
some of the main thread's tensors (and allocate their own buffers). So the CPU allocator is
told to count every thread (c10's ``caffe2_report_cpu_memory_usage``), and the profile's
"Total Allocated" field, that global count, gives the two figures; without that switch the
events are replayed by address. Both count tensor storage only, not allocator caching or
fragmentation.

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

            self.counts_all_threads = _count_cpu_allocations_on_all_threads()
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
            return {
                "static_bytes": self.static,
                "peak_bytes": torch.cuda.max_memory_allocated(),
                "device": "cuda",
            }
        self.profiler.__exit__(None, None, None)
        static, peak = replay(self.profiler, self.counts_all_threads)
        return {"static_bytes": static, "peak_bytes": peak, "device": "cpu"}


def _count_cpu_allocations_on_all_threads() -> bool:
    """Switch on c10's global CPU allocation count (every thread); False where this build does not export it."""
    import ctypes

    import torch

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
        ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True
    except (OSError, ValueError):
        return False
    return True


def replay(profiler, total_is_global: bool) -> tuple[int, int]:
    """(live bytes at the mark, peak after it) from the profile's allocation events.

    With the global count on, each event carries the bytes live in the whole process. Without
    it, the events are matched by address: a free the main thread never saw (gloo dropped the
    last reference) shows when the address is handed out again, and a free of a block made on
    another thread is not counted. The running sum of sizes alone drifts upwards differently
    on every run.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the addresses are only in the trace export
        path = os.path.join(tmp, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mark = min((e["ts"] for e in events if e.get("name") == _MARK), default=None)
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]"),
        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
    )
    blocks: dict[int, int] = {}
    live, static, peak = 0, None, 0
    for e in memory:
        if static is None and mark is not None and e["ts"] >= mark:
            static = peak = live
        addr, nbytes = e["args"]["Addr"], e["args"]["Bytes"]
        if total_is_global:
            live = e["args"]["Total Allocated"]
        else:
            # freed here, or (address reused) freed unseen on another thread
            live -= blocks.pop(addr, 0)
            if nbytes > 0:
                blocks[addr] = nbytes
                live += nbytes
        if static is not None:
            peak = max(peak, live)
    if static is None:
        static = peak = live
    return static, peak


def write_report(folder: str, rank: int, report: dict, extra: dict) -> str:
    path = os.path.join(folder, f"memory_rank{rank}.json")
    with open(path, "w") as f:
        json.dump({**report, **extra}, f, indent=1)
    return path


def reset_host_peak() -> bool:
    """Start the process's peak resident memory (VmHWM) afresh; False where the kernel offers no reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def host_memory() -> dict:
    """``{"rss_bytes", "peak_rss_bytes"}`` of this process now (Linux's /proc); {} elsewhere."""
    fields = {"VmRSS:": "rss_bytes", "VmHWM:": "peak_rss_bytes"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, *value = line.split()
                if key in fields:
                    out[fields[key]] = int(value[0]) * 1024
    except OSError:
        return {}
    return out
