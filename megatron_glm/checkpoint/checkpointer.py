"""The save policy of a run: when to save (``--save-interval``, the end, a stop), and the resume's restore."""

from __future__ import annotations

import os
import time

from megatron_glm.checkpoint import universal
from megatron_glm.checkpoint.async_save import BackgroundWriter
from megatron_glm.checkpoint.deepspeed_io import load_checkpoint
from megatron_glm.checkpoint.format import tag_of
from megatron_glm.checkpoint.resume import ResumePoint
from megatron_glm.checkpoint.save import save_checkpoint


class Checkpointer:
    """Saves on ``--save-interval``, at the end and on a stop request; remembers the latest one.

    With ``asynchronous`` (``--async-save``) a save returns after the host copy and is written in
    the background; ``wait`` blocks until it is complete (and raises its failure).
    """

    def __init__(
        self,
        save_dir: str | None,
        interval: int | None,
        keep_last: int,
        meta: dict,
        rank: int,
        resume: ResumePoint | None,
        asynchronous: bool = False,
    ):
        self.save_dir, self.interval, self.keep_last, self.meta, self.rank = (
            save_dir,
            interval,
            keep_last,
            meta,
            rank,
        )
        self.last_saved = resume.tag if resume else None
        self.writer = None
        if asynchronous and save_dir:
            self.writer = BackgroundWriter()
        # the last save held the loop this long; of that, waiting for the last
        self.blocked_s = self.waited_s = 0.0

    def due(self, iteration: int, last_iteration: int) -> bool:
        return bool(self.save_dir) and (
            (bool(self.interval) and iteration % self.interval == 0) or iteration == last_iteration
        )

    def saved(self, iteration: int) -> bool:
        return self.last_saved == tag_of(iteration)

    def save(self, engine, iteration: int, consumed_samples: int) -> str:
        started = time.perf_counter()
        self.wait()  # the previous save, when asynchronous
        self.waited_s = time.perf_counter() - started
        folder = save_checkpoint(
            engine,
            self.save_dir,
            iteration,
            {**self.meta, "consumed_samples": consumed_samples},
            self.keep_last,
            self.rank,
            self.writer,
        )
        self.blocked_s = time.perf_counter() - started
        self.last_saved = os.path.basename(folder)
        return folder

    def wait(self) -> None:
        """The save in flight is complete (a no-op for synchronous saves)."""
        if self.writer is not None:
            self.writer.wait()

    @staticmethod
    def load(
        engine,
        resume: ResumePoint,
        trust: bool,
        optimizer: bool = True,
        rng: bool = True,
        chunks=None,
        universal_reader=None,
    ) -> tuple[int, int]:
        """(iteration, consumed samples) after restoring the engine; converted and resharded weights are already
        in the model (``chunks``), a resharded checkpoint's optimizer state comes from ``universal_reader``.

        ``optimizer``/``rng`` False (``--no-load-optim``/``--no-load-rng``) keep those fresh; fine-tuning takes the
        weights alone and starts at iteration 0.
        """
        if resume.reshard:
            universal.load(
                engine,
                chunks,
                universal_reader,
                resume,
                optimizer and not resume.finetune,
                rng and not resume.finetune,
            )
        elif not resume.weights_only:
            load_checkpoint(
                engine,
                resume.load_dir,
                resume.tag,
                trust,
                optimizer and not resume.finetune,
                rng and not resume.finetune,
            )
        return (
            (0, 0)
            if resume.finetune
            else (resume.meta["iteration"], resume.meta["consumed_samples"])
        )
