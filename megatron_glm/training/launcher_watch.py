"""A rank whose launcher has died stops within a second, without saving.

torchrun's agent, the deepspeed launcher, an MPI proxy or slurmstepd starts the ranks and is
their parent. When it is killed (``kill -9``, an OOM kill), nothing tells the ranks: they are
reparented and go on training and writing checkpoints that no job owns, into a folder the
relaunched job is about to use. Each rank therefore remembers its parent and polls for a
change; reparenting happens only when the parent has exited. A run with no launcher (one
process from a shell) is left alone, so ``nohup glm-pretrain ...`` outlives its terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)
EXIT_LAUNCHER_GONE = 1


def watch_launcher(source: str, interval: float = 1.0) -> None:
    """Start the watch for a rank started by a launcher (``Launch.source`` other than ``single``)."""
    if source == "single":
        return
    parent = os.getppid()
    stop = threading.Event()

    def watch():
        while not stop.wait(interval):
            if os.getppid() != parent:
                logger.error(
                    f"the launcher that started this rank (pid {parent}) is gone: stopping without saving; "
                    "relaunch the job to resume from its latest complete checkpoint"
                )
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                # now, whatever the main thread is doing (a collective, a save)
                os._exit(EXIT_LAUNCHER_GONE)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
