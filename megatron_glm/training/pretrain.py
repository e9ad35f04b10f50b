"""glm-pretrain: flags -> a ``JobConfig`` (``training/config.py``) -> the ``Trainer`` (``training/trainer.py``).

The flags follow Megatron-LM; they are checked and turned into config dataclasses in one
place, before a process group, a tokenizer or data is touched, and the Trainer is built
from those.
"""

from __future__ import annotations

import faulthandler
import sys

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from megatron_glm import logs
from megatron_glm.checkpoint import CheckpointError
from megatron_glm.data.indexed import IndexedDatasetError
from megatron_glm.data.loader import DataError
from megatron_glm.data.tokenizer import TokenizerError
from megatron_glm.parallel.state import discover_launch, exit_without_teardown
from megatron_glm.training import dry_run
from megatron_glm.training.arguments import build_parser
from megatron_glm.training.config import from_args
from megatron_glm.training.launcher_watch import watch_launcher
from megatron_glm.training.trainer import Trainer, TrainingError


def pretrain(argv=None) -> dict:
    """Run glm-pretrain; returns a summary (iterations done, last losses, exit status)."""
    args = build_parser().parse_args(argv)
    if args.dry_run:  # one process, no launcher: the whole job on fake tensors
        logs.setup(0, False)
        return dry_run.execute(args)
    launch = discover_launch()  # torchrun's variables, Slurm's, MPI's, or one process
    logs.setup(launch.rank, args.log_all_ranks)
    watch_launcher(launch.source)
    job = from_args(args, world_size=launch.world_size)

    trainer = Trainer(job)
    try:
        return trainer.train()
    finally:
        trainer.close()


# what a user's mistake raises: one line, not a traceback
USER_ERRORS = (
    ValueError,
    TokenizerError,
    IndexedDatasetError,
    CheckpointError,
    FileNotFoundError,
    TrainingError,
    DataError,
)


def run_command(name: str, run, argv=None) -> int:
    """A training command's exit status: ``run(argv)``'s, or 1 after one line for a user's mistake."""
    try:
        result = run(argv)
    except USER_ERRORS as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop's handler was set, or a second Ctrl-C
        print(f"{name}: interrupted; the latest complete checkpoint is untouched", file=sys.stderr)
        return 130

    if dist.is_initialized():  # leave together: gloo aborts a rank whose peer has gone
        dist.barrier()
        dist.destroy_process_group()
    return result["exit_code"]


def main(argv=None) -> int:
    return run_command("glm-pretrain", pretrain, argv)


@record  # under torchrun, an uncaught exception goes to its error file: glm-torchrun reports it as a crash
def cli() -> None:
    """The ``glm-pretrain`` command: ``main``, then leave without the interpreter's teardown.

    Every file is written and closed by then. Gloo's worker threads can still be joinable during
    interpreter finalization and ``std::terminate`` the process (SIGABRT) after a successful run,
    so the command exits directly.
    """

    faulthandler.enable()  # a rank that dies on a signal (SIGABRT, SIGSEGV) prints every thread's Python stack
    exit_without_teardown(main())


if __name__ == "__main__":
    cli()
