"""Stop cleanly before a time limit or preemption: finish the step, save, exit for requeue.

Slurm warns a job with a signal (``--signal=USR1@180``) or ends it with SIGTERM; a batch
script that only sees the warning itself (``--signal=B:USR1@...``, the torchrun launcher)
creates the ``--stop-file`` instead. Any one rank noticing either is enough: every step ends
with one all-reduce (MAX) of the flag, so all ranks stop after the same step, write one
checkpoint together and exit with ``EXIT_REQUEUE`` (75, EX_TEMPFAIL: "try again"), which
the launchers turn into ``scontrol requeue``. The next start resumes from that checkpoint.
Ctrl-C (SIGINT) stops the same way but exits 130; a second Ctrl-C stops at once, leaving the
last complete checkpoint as it was.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130  # the shell's status for Ctrl-C
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


DURATION = "--exit-duration-in-mins reached"  # a planned stop: exit status 0


class Preemption:
    """Stop requests: a signal, the stop file, or (``deadline``, monotonic seconds) the run's time budget."""

    def __init__(
        self, stop_file: str | None, device: str, rank: int, deadline: float | None = None
    ):
        self.stop_file, self.device, self.rank, self.deadline = stop_file, device, rank, deadline
        self.received: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        # left by the run before a requeue
        if stop_file and rank == 0 and os.path.exists(stop_file):
            os.remove(stop_file)
        if dist.is_initialized():
            dist.barrier()  # nobody checks the stop file before the stale one is gone

    def _handle(self, signum, _frame) -> None:
        # Ctrl-C twice: stop now, without the save
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def requested(self) -> str | None:
        """Called by every rank after every step: the reason to stop, or None.

        Every rank gets a reason of the same kind: a preemption (a signal, the stop file) wins over
        the time budget, which ranks may reach a moment apart.
        """
        local = self.received or (
            self.stop_file
            if self.stop_file and self.rank == 0 and os.path.exists(self.stop_file)
            else None
        )
        if not local and self.deadline is not None and time.monotonic() > self.deadline:
            local = DURATION
        if dist.is_initialized():
            kind = 2.0 if local and local != DURATION else 1.0 if local else 0.0
            flag = torch.tensor([kind], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() == 2.0 and (not local or local == DURATION):
                local = "another rank was told to stop"
            elif flag.item() == 1.0 and not local:
                local = DURATION
        return local

    def wait(self, poll_s: float = 0.05) -> str:
        """Block (every rank, in step) until some rank is asked to stop; the reason."""
        while not (reason := self.requested()):
            time.sleep(poll_s)
        return reason

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
