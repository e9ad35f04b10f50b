"""Which global sample indices a data-parallel rank reads, from the number already consumed.

Training state keeps one integer, ``consumed_samples``; global batch ``g`` is samples
``[g*G, (g+1)*G)`` whatever the data-parallel size, and each rank takes its own
micro-batches from it. A run can therefore resume at any sample, with a different
data-parallel size, and read exactly the samples an uninterrupted run would have read.
"""

from __future__ import annotations


class PretrainingSampler:
    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError("micro batch size and data-parallel size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data-parallel rank {data_parallel_rank} outside a group of {data_parallel_size}"
            )
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed samples {consumed_samples} outside the {total_samples} available"
            )
        self.total, self.consumed = total_samples, consumed_samples
        self.micro, self.rank, self.size = micro_batch_size, data_parallel_rank, data_parallel_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro * self.size)

    def __iter__(self):
        """Micro-batches (lists of sample indices) of this rank; an incomplete last step is dropped."""
        step = self.micro * self.size
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.rank * self.micro
            yield list(range(first, first + self.micro))
