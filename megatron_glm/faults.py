"""Fault injection for the crash, overflow and preemption tests: ``MEGATRON_GLM_FAULT`` names one.

- ``save:staged``, ``save:renamed``, ``iteration:N``: SIGKILL at that point (a crash at the
  worst moment: mid-save, between the rename and ``latest``, between saves);
- ``overflow:N``: an fp16 overflow in step N's gradients;
- ``worker_crash:N``: a data-loader worker SIGKILLs itself when it reaches sample N;
- ``hold:N``: after step N, wait for a stop request (a signal or the stop file), so that a
  test's signal lands after a known step however fast or loaded the machine is.
"""

from __future__ import annotations

import os
import signal


def _fault() -> str:
    return os.environ.get("MEGATRON_GLM_FAULT", "")


def crash_point(name: str) -> None:
    if _fault() == name:
        os.kill(os.getpid(), signal.SIGKILL)


def overflow_at(iteration: int) -> bool:
    return _fault() == f"overflow:{iteration}"


def holds_after(iteration: int) -> bool:
    return _fault() == f"hold:{iteration}"


def worker_crash_at(sample: int) -> bool:
    return _fault() == f"worker_crash:{sample}"
