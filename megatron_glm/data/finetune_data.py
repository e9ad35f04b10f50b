"""Fine-tuning data: labelled JSONL as GLM rows, each example laid out whole in one micro-batch.

The GLM paper fine-tunes every task as blank filling, with the rows glm-eval scores
(``eval_tasks.Row``):

- ``classification``: a cloze question. A row of glm-eval's choice format
  (``{"text": "... [MASK] ...", "choices": [...], "label": i}``), or any row whose string fields
  fill ``--pattern`` (``"{sentence1} ? [MASK] , {sentence2}"``) with one ``--verbalizer`` word per
  label. An example is its candidates, one row each (Part B is the candidate teacher-forced), in
  consecutive rows of one micro-batch, so the loss over them stays on one rank. With
  single-token verbalizers the ``fast`` layout has one row per example and reads each
  candidate's logit at ``[sop]`` (equal scores, a candidate count fewer rows).
- ``seq2seq``: ``{"source", "target"}``: the source then ``[gMASK]`` is Part A, ``[sop]`` and the
  target Part B, with ``[eop]`` its last target; the loss is on the target only.

Training reads examples in a fresh permutation per epoch, seeded by ``(seed, epoch)``: sample
``k`` is example ``perm[epoch][k % n]``, so a resumed run (the loader's position is its
consumed sample count) reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch

from megatron_glm.data import eval_tasks
from megatron_glm.data.eval_tasks import Row, TaskError

TASKS = ("classification", "seq2seq")


@dataclass
class Examples:
    """A split of a task: its rows (an example's rows consecutive), each example's label (classification), and
    for seq2seq each example's target text (what decoding is compared with)."""

    task: str
    rows: list[Row]
    labels: list[int] | None = None
    targets: list[str] | None = None
    candidates: int = 1  # rows per example: the most candidates of any example (classification)
    single_token: bool = False  # every candidate is one token: the fast layout can serve it

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.rows)

    def of(self, example: int) -> list[Row]:
        """The rows of one example."""
        return self.by_example[example]

    def __post_init__(self):
        self.by_example: list[list[Row]] = [[] for _ in range(len(self))]
        for row in self.rows:
            self.by_example[row.item].append(row)


def pattern_rows(path: str, pattern: str, verbalizers: tuple[str, ...]) -> list[tuple[int, dict]]:
    """A sentence / sentence-pair file as choice rows: ``pattern`` filled with each row's fields, one
    candidate per label (``verbalizers[label]``), ``label`` an index or one of the verbalizers."""
    fields = [name for _, name, _, _ in string.Formatter().parse(pattern) if name]
    if "[MASK]" not in pattern:
        raise TaskError(
            f"--pattern {pattern!r} has no [MASK]: the blank the verbalizer fills goes there"
        )
    out = []
    for n, obj in eval_tasks.read_jsonl(path, "classification", text_field=None):
        missing = [f for f in fields if not isinstance(obj.get(f), str)]
        if missing:
            raise TaskError(
                f"{path}:{n}: --pattern needs the string field{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)}, the row has {sorted(obj)}"
            )
        label = obj.get("label")
        if isinstance(label, str) and label in verbalizers:
            label = verbalizers.index(label)
        out.append(
            (
                n,
                {
                    "text": pattern.format(**{f: obj[f].strip() for f in fields}),
                    "choices": list(verbalizers),
                    "label": label,
                },
            )
        )
    return out


def classification(
    path: str, tokenizer, limit: int, pattern: str | None = None, verbalizers=()
) -> Examples:
    """A classification split: glm-eval's choice rows (``pattern``: made from a sentence file first)."""
    objects = pattern_rows(path, pattern, tuple(verbalizers)) if pattern else None
    rows, labels = eval_tasks.choice_rows(path, tokenizer, limit, objects)
    per_example = np.bincount([r.item for r in rows])
    single = all(len(r.targets) == 1 for r in rows)
    return Examples("classification", rows, labels, None, int(per_example.max()), single)


def seq2seq(path: str, tokenizer, limit: int) -> Examples:
    """A seq2seq split: ``source [gMASK]`` then ``[sop] target``, ``target [eop]`` the targets."""
    rows, targets = [], []
    for item, (n, obj) in enumerate(eval_tasks.read_jsonl(path, "seq2seq", text_field=None)):
        source, target = obj.get("source"), obj.get("target")
        if not isinstance(source, str) or not source.strip():
            raise TaskError(f'{path}:{n}: needs a non-empty string "source"')
        if not isinstance(target, str) or not target.strip():
            raise TaskError(f'{path}:{n}: needs a non-empty string "target"')
        part_a = tokenizer.encode(source.rstrip(), allow_special=True)
        if tokenizer.gmask_id not in part_a[-1:]:
            part_a.append(tokenizer.gmask_id)
        blanks = [t for t in part_a if t in (tokenizer.mask_id, tokenizer.gmask_id)]
        if len(blanks) != 1:
            raise TaskError(
                f"{path}:{n}: the source holds a blank of its own ([MASK] or [gMASK]); the target fills the one "
                "after the source: take it out of the source"
            )
        span = tokenizer.encode_running(target.strip())
        rows.append(
            Row(
                part_a,
                len(part_a) - 1,
                [tokenizer.sop_id] + span,
                span + [tokenizer.eop_id],
                item,
                gmask=True,
            )
        )
        targets.append(target.strip())
    eval_tasks.check_lengths(rows, limit, path, what="source and target")
    return Examples("seq2seq", rows, None, targets)


def read_split(
    task: str, path: str, tokenizer, limit: int, pattern=None, verbalizers=()
) -> Examples:
    if task == "classification":
        return classification(path, tokenizer, limit, pattern, verbalizers)
    return seq2seq(path, tokenizer, limit)


class Layout:
    """How examples become a micro-batch: ``rows_per_example`` rows each, padded to ``examples`` examples.

    Beyond the batch contract, a classification micro-batch carries ``choice_label`` ``[examples]`` (-1: a
    padding example) and ``choice_valid`` ``[examples, candidates]`` (0: a candidate the example lacks), and the
    fast layout ``choice_tokens`` ``[examples, candidates]`` (each candidate's one token).
    """

    def __init__(self, split: Examples, seq_length: int, pad: int, positions_1d: bool, fast: bool):
        if fast and not split.single_token:
            raise TaskError(
                "--single-token-fast-path needs every verbalizer to be one token; some are longer"
            )
        self.split, self.seq_length, self.pad, self.positions_1d = (
            split,
            seq_length,
            pad,
            positions_1d,
        )
        self.fast = fast
        self.candidates = split.candidates
        self.rows_per_example = 1 if fast or split.task == "seq2seq" else split.candidates

    def __call__(self, examples: list[int], size: int) -> dict[str, torch.Tensor]:
        """The micro-batch of ``examples`` (indices into the split), padded to ``size`` examples."""
        split, per, c = self.split, self.rows_per_example, self.candidates
        rows: list[Row | None] = []
        for e in examples:
            own = split.of(e)
            if self.fast:
                first = own[0]  # every candidate's row has the same Part A and [sop]
                rows.append(Row(first.part_a, first.mask_pos, first.part_b, first.targets, e))
            else:
                rows += own + [None] * (per - len(own))
        arrays = eval_tasks.layout(
            [r for r in rows if r is not None], self.seq_length, self.pad, None, self.positions_1d
        )
        arrays = _spread(
            arrays, [r is not None for r in rows], size * per, self.seq_length, self.pad
        )
        if split.task == "classification":
            label = np.full(size, -1, np.int64)
            valid = np.zeros((size, c), np.float32)
            tokens = np.zeros((size, c), np.int64)
            for k, e in enumerate(examples):
                own = split.of(e)
                label[k], valid[k, : len(own)] = split.labels[e], 1.0
                if self.fast:
                    tokens[k, : len(own)] = [r.targets[0] for r in own]
            arrays.update(choice_label=label, choice_valid=valid)
            if self.fast:
                arrays["choice_tokens"] = tokens
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _spread(arrays: dict, present: list[bool], total: int, length: int, pad: int) -> dict:
    """``arrays`` of the present rows placed at their slots among ``total`` rows; the others pad (score nothing)."""
    empty = eval_tasks.layout([], length, pad, total)
    at = np.flatnonzero(present)
    for k, v in arrays.items():
        empty[k][at] = v
    return empty


class EpochSamples:
    """Sample ``k`` of training: example ``perm(seed, k // n)[k % n]``, a fresh order each epoch."""

    def __init__(self, count: int, total_samples: int, seed: int):
        self.count, self.total, self.seed = count, total_samples, seed
        self._order: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, k: int) -> int:
        epoch = k // self.count
        order = self._order.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            self._order = {epoch: order}  # one epoch at a time: samples are read in order
        return int(order[k % self.count])


class TrainBatches:
    """``MicroBatches``' collate for fine-tuning: (sample index, example) pairs to one micro-batch."""

    def __init__(self, layout: Layout, micro_batch_size: int):
        self.layout, self.micro = layout, micro_batch_size

    def __call__(self, samples) -> dict:
        return self.layout([example for _, example in samples], self.micro)
