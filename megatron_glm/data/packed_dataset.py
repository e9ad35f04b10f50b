"""Documents of one corpus, shuffled per epoch, concatenated and cut into fixed-length samples.

GLM packs text to the sequence length (no padding) and the collator needs to know where
documents begin inside a sample (spans are spread over documents in proportion to their
lengths), so a sample is its tokens plus the lengths of the document pieces it holds.
The three index arrays depend only on (corpus, document range, sample length, number of
samples, seed) and are cached (``index_cache``); sample ``i`` is fetched from them alone.
"""

from __future__ import annotations

import numpy as np

from megatron_glm.data.index_cache import load_or_build
from megatron_glm.data.indexed import IndexedDataset

INDEX_VERSION = 1  # bump when the construction below changes, to invalidate caches


class PackedDataset:
    def __init__(
        self,
        indexed: IndexedDataset,
        doc_begin: int,
        doc_end: int,
        sample_length: int,
        num_samples: int | None,
        seed: int,
        cache_dir: str,
        name: str = "train",
    ):
        if sample_length < 1:
            raise ValueError(f"sample length must be positive, got {sample_length}")
        self.indexed, self.sample_length, self.name = indexed, sample_length, name
        self.doc_begin, self.doc_end = doc_begin, doc_end
        self._doc_lengths = indexed.document_lengths()
        lengths = self._doc_lengths[doc_begin:doc_end]
        tokens_per_epoch = int(lengths.sum())
        if tokens_per_epoch < sample_length:
            raise ValueError(
                f"the {name} split of {indexed.prefix} (documents {doc_begin}..{doc_end}) holds "
                f"{tokens_per_epoch} tokens, less than one sample of {sample_length}: give the split more "
                "documents (--split), more data, or use a shorter sequence"
            )
        if num_samples is None:
            num_samples = tokens_per_epoch // sample_length
        self.num_epochs = -(-num_samples * sample_length // tokens_per_epoch)
        description = {
            "version": INDEX_VERSION,
            "data": indexed.fingerprint(),
            "documents": [doc_begin, doc_end],
            "sample_length": sample_length,
            "num_samples": num_samples,
            "seed": seed,
            "split": name,
        }

        def build():
            return build_sample_index(
                lengths, doc_begin, sample_length, num_samples, self.num_epochs, seed
            )

        stem = f"{indexed.prefix.rsplit('/', 1)[-1]}_{name}"
        arrays = load_or_build(cache_dir, stem, description, build)
        self.doc_idx, self.sample_idx, self.shuffle_idx = (
            arrays["doc"],
            arrays["sample"],
            arrays["shuffle"],
        )

    def __len__(self) -> int:
        return self.shuffle_idx.size

    def __getitem__(self, i: int) -> dict:
        """``{"text": int64 [L], "document_lengths": int64 [pieces]}`` for sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(
                f"sample {i} out of range for {len(self)} samples of the {self.name} split"
            )
        pos, offset = (int(v) for v in self.sample_idx[int(self.shuffle_idx[i])])
        need, pieces, lengths = self.sample_length, [], []
        while need:
            doc = int(self.doc_idx[pos])
            take = min(int(self._doc_lengths[doc]) - offset, need)
            if take:
                pieces.append(self.indexed.document(doc, offset, take))
                lengths.append(take)
            need -= take
            pos, offset = pos + 1, 0
        return {
            "text": np.concatenate(pieces).astype(np.int64),
            "document_lengths": np.asarray(lengths, np.int64),
        }


def build_sample_index(
    lengths: np.ndarray,
    doc_begin: int,
    sample_length: int,
    num_samples: int,
    num_epochs: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Vectorised: document order per epoch, where each sample starts, and the sample shuffle.

    ``doc``: corpus document ids, one permutation of the range per epoch.
    ``sample``: ``[num_samples, 2]`` = (position in ``doc``, token offset in that document).
    ``shuffle``: a permutation of the samples.
    """
    n = lengths.size
    id_dtype = np.int32 if doc_begin + n < 2**31 else np.int64
    doc_idx = np.concatenate(
        [
            np.random.default_rng([seed, epoch]).permutation(n).astype(id_dtype)
            for epoch in range(num_epochs)
        ]
    )
    ends = np.cumsum(lengths[doc_idx], dtype=np.int64)  # token offset where each doc position ends
    starts = np.arange(num_samples, dtype=np.int64) * sample_length
    pos = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[pos] - lengths[doc_idx[pos]])
    doc_idx += doc_begin
    sample_idx = np.stack([pos, offset], axis=1).astype(np.int64)
    shuffle_idx = np.random.default_rng([seed, 2**31]).permutation(num_samples).astype(np.int64)
    return {"doc": doc_idx, "sample": sample_idx, "shuffle": shuffle_idx}
