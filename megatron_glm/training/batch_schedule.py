"""How many samples each step takes: the global batch, or Megatron's ramp-up to it (``--rampup-batch-size``).

Ramp-up starts at ``start`` samples a step and adds ``increment`` every
``samples / ((global - start) / increment)`` consumed samples until the global batch size;
the formula is megatron-core's ``RampupBatchsizeNumMicroBatchesCalculator``'s (the tests
hold ours to it). The step's size depends only on the samples consumed before it, so a
resumed run takes the same sizes. ``iterations_for`` is Megatron's count of the steps in
``--train-samples``: the ramp-up's steps, then whole global batches (a partial one is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSchedule:
    global_batch_size: int
    unit: int  # micro-batch size x data-parallel size: every step's size is a multiple of it
    rampup: tuple[int, int, int] | None = None  # (start, increment, samples)

    def problems(self) -> list[str]:
        if self.rampup is None:
            return []
        start, increment, samples = self.rampup
        flag = f"--rampup-batch-size {start} {increment} {samples}"
        if start < 1 or increment < 1 or samples < 0:
            return [
                f"{flag}: the start and increment must be positive and the samples not negative"
            ]
        if start >= self.global_batch_size:
            return [f"{flag}: the start must be below --global-batch-size {self.global_batch_size}"]
        found = []
        if (self.global_batch_size - start) % increment:
            found.append(
                f"{flag}: --global-batch-size {self.global_batch_size} minus the start is not a multiple "
                f"of the increment"
            )
        if start % self.unit or increment % self.unit:
            found.append(
                f"{flag}: the start and the increment must be multiples of --micro-batch-size x "
                f"data-parallel size ({self.unit}), so that every step is whole micro-batches"
            )
        return found

    def size_at(self, consumed: int) -> int:
        """The global batch of the step that starts after ``consumed`` samples."""
        if self.rampup is None:
            return self.global_batch_size
        start, increment, samples = self.rampup
        if consumed > samples:
            return self.global_batch_size
        per_increment = samples / ((self.global_batch_size - start) // increment)
        return start + int(consumed / per_increment) * increment

    def consumed_before(self, step: int) -> int:
        """Samples consumed before step ``step`` (0-based)."""
        consumed = 0
        for done in range(step):
            if self.rampup is None or consumed > self.rampup[2]:  # constant from here on
                return consumed + (step - done) * self.global_batch_size
            consumed += self.size_at(consumed)
        return consumed

    def iterations_for(self, train_samples: int) -> int:
        """Megatron's ``update_train_iters``: the whole ramp, then whole global batches. For a
        ``--train-samples`` inside the ramp the second term is negative and takes back the steps
        past it, counted in global batches (Python's floor division, as in Megatron)."""
        iterations, consumed = 0, 0
        if self.rampup is not None:
            while consumed <= self.rampup[2]:
                consumed += self.size_at(consumed)
                iterations += 1
        return iterations + (train_samples - consumed) // self.global_batch_size
