"""Fault injection for the crash, overflow and preemption tests: ``MEGATRON_GLM_FAULT`` names one.

- ``save:staged``, ``save:renamed``, ``iteration:N``: SIGKILL at that point (a crash at the
  worst moment: mid-save, between the rename and ``latest``, between saves);
- ``overflow:N``: an fp16 overflow in step N's gradients;
- ``nan_loss:N``: step N reports a NaN loss (a diverged run);
- ``worker_crash:N``: a data-loader worker SIGKILLs itself when it reaches sample N;
- ``hold:N``: after step N, wait for a stop request (a signal or the stop file), so that a
  test's signal lands after a known step however fast or loaded the machine is;
- ``async:writing``: SIGKILL in an ``--async-save`` writer after its first file;
- ``async:late``: an ``--async-save`` writer starts only once the next step is done, so that a
  save that kept references to live tensors (rather than host copies) would be caught.

Several faults are joined by commas.
"""

from __future__ import annotations

import os
import signal
import threading


def _faults() -> set[str]:
    return set(os.environ.get("MEGATRON_GLM_FAULT", "").split(","))


def crash_point(name: str) -> None:
    if name in _faults():
        os.kill(os.getpid(), signal.SIGKILL)


def overflow_at(iteration: int) -> bool:
    return f"overflow:{iteration}" in _faults()


def nan_loss_at(iteration: int) -> bool:
    return f"nan_loss:{iteration}" in _faults()


def holds_after(iteration: int) -> bool:
    return f"hold:{iteration}" in _faults()


def worker_crash_at(sample: int) -> bool:
    return f"worker_crash:{sample}" in _faults()


_progress = threading.Condition()
_steps_done = 0.0


def step_done(iteration: float) -> None:
    """The training loop finished ``iteration`` (``math.inf``: the loop is over)."""
    global _steps_done
    with _progress:
        _steps_done = iteration
        _progress.notify_all()


def write_late(iteration: int) -> None:
    """``async:late``: hold the writer of ``iteration``'s save until the loop has run past it."""
    if "async:late" in _faults():
        with _progress:
            _progress.wait_for(lambda: _steps_done > iteration)
