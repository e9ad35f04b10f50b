"""``glm-torchrun`` (``python -m megatron_glm.training.torchrun``): torchrun, with our workers' deliberate exits
reported as what they are.

torchrun takes any non-zero worker exit for a crash: an error line, a ``ChildFailedError``
traceback and a "FAILED" box follow, and it exits 1. glm-pretrain exits non-zero on purpose:
75 after saving for a requeue, 1 after its one-line error (a wrong flag, an impossible layout),
130 on an interrupt. Those keep their own line, and their status is this command's. A worker that
raised (glm-pretrain's ``record`` writes torchrun's error file) or died of a signal still gets
torchrun's whole report. A signal to torchrun itself (Slurm's SIGTERM when a job is requeued or
cancelled) stops the workers, which save on it, and is one line too, with status 128 + the
signal. Arguments and behaviour are otherwise torchrun's own (``run``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from megatron_glm.training.preemption import EXIT_INTERRUPTED, EXIT_REQUEUE

DELIBERATE = {
    1: None,  # the worker said what was wrong, in one line
    EXIT_REQUEUE: "the workers saved a checkpoint and stopped to be requeued (exit 75)",
    EXIT_INTERRUPTED: "the workers were interrupted; the latest complete checkpoint is untouched",
}


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    # the agent logs every failed worker at ERROR before anyone can tell a deliberate exit: the report
    # below says the same for a crash
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        # the first worker to fail decides (torchrun then stops the others with SIGTERM); a worker that raised has
        # an error file (written by ``record``), a signal is a negative code
        first = e.get_first_failure()[1]
        raised = any(os.path.isfile(f.error_file) for f in e.failures.values())
        if raised or first.exitcode not in DELIBERATE:
            print(
                e.format_msg(), file=sys.stderr
            )  # torchrun's report: the root cause, every failure
            return 1
        code = first.exitcode
        if DELIBERATE[code]:
            print(f"glm-torchrun: {DELIBERATE[code]}", file=sys.stderr)
        return code
    except SignalException as e:  # torchrun has stopped the workers with the same signal
        name = signal.Signals(e.sigval).name
        print(
            f"glm-torchrun: stopped by {name}; the workers save and stop on SIGTERM and SIGUSR1 "
            "(their log says which checkpoint they wrote)",
            file=sys.stderr,
        )
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
