"""Evaluation tasks as GLM rows, and their metrics from each row's score.

Every task is cast as blank filling, as the GLM paper casts classification and generation:
a row is Part A (the text, its blank a ``[MASK]``, or ``[gMASK]`` at its end) and Part B
(``[sop]`` and a candidate, teacher-forced). The model scores each row once: the summed
negative log-likelihood of its Part B targets, their count, and how many of them are the
model's argmax (``GLMModel.score``). The metrics follow:

- ``blank``: held-out documents, spans blanked by the collator's token objective (its draws,
  seeded per document); one row per span, with ``[eop]`` as its last target. A span is an
  exact match when every target is the argmax given the true prefix: that is exactly when
  greedy generation reproduces it and stops. Token accuracy is the teacher-forced share, and
  the loss the mean negative log-likelihood per target token.
- ``choice``: JSONL ``{"text": "... [MASK] ...", "choices": [...], "label": i}``; one row per
  choice, scored by its log-likelihood in the blank, summed and per token (both reported).
- ``lambada``: JSONL ``{"text": ...}``; the context and ``[gMASK]``, then the last word: right
  when all of its tokens are the argmax; its perplexity too.
- ``lm`` (in ``runner.py``): the loss and perplexity of the training objective on a split.

The rows of a task do not depend on how they are later batched or spread over ranks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

KINDS = ("blank", "choice", "lambada")


class TaskError(ValueError):
    """A task file that cannot be evaluated; the message names the file, the line and the fix."""


@dataclass
class Row:
    part_a: list[int]
    mask_pos: int  # Part B's position (the blank's place in Part A)
    part_b: list[int]  # inputs: [sop] + the candidate (all of it, or all but its last token)
    targets: list[int]  # what each Part B input predicts
    item: int  # the task item the row belongs to
    choice: int = 0
    gmask: bool = False  # a [gMASK] blank: GLM-130B's 1D positions continue from it

    def __len__(self) -> int:
        return len(self.part_a) + len(self.part_b)


def layout(
    rows: list[Row], length: int, pad: int, size: int | None = None, positions_1d: bool = False
) -> dict[str, np.ndarray]:
    """The batch contract for ``rows`` padded to ``length`` (and to ``size`` rows, with rows that score nothing):
    Part A bidirectional, Part B causal; ``positions_1d``: GLM-130B's positions in row 0 (the model's
    ``positions_1d``), where a [gMASK] span continues from its blank."""
    n = size or len(rows)
    tokens = np.full((n, length), pad, np.int64)
    labels = np.zeros((n, length), np.int64)
    loss_mask = np.zeros((n, length), np.float32)
    positions = np.zeros((n, 2, length), np.int64)
    lo = np.zeros((n, length), np.int32)
    hi = np.ones((n, length), np.int32)  # padding looks at the first token only
    for r, row in enumerate(rows):
        a, b = len(row.part_a), len(row.part_b)
        tokens[r, :a], tokens[r, a : a + b] = row.part_a, row.part_b
        labels[r, a : a + b], loss_mask[r, a : a + b] = row.targets, 1.0
        positions[r, 0, :a], positions[r, 0, a : a + b] = np.arange(a), row.mask_pos
        positions[r, 1, a : a + b] = np.arange(1, b + 1)
        if positions_1d and row.gmask:
            positions[r, 0, a : a + b] += np.arange(1, b + 1)
        hi[r, :a], hi[r, a : a + b] = a, np.arange(a + 1, a + b + 1)
    return {
        "tokens": tokens,
        "position_ids": positions,
        "attn_lo": lo,
        "attn_hi": hi,
        "labels": labels,
        "loss_mask": loss_mask,
        "objective": np.zeros(n, np.int64),
    }


def read_jsonl(path: str, kind: str, text_field: str | None = "text") -> list[tuple[int, dict]]:
    """(line number, object) of each non-empty line; each must hold a non-empty string ``text_field`` (None:
    any JSON object)."""
    if not os.path.exists(path):
        raise TaskError(f"{kind} task file {path} does not exist")
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TaskError(
                    f"{path}:{n}: not a JSON object ({e}); one object per line"
                ) from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{n}: not a JSON object; one object per line")
            if text_field and (
                not isinstance(row.get(text_field), str) or not row[text_field].strip()
            ):
                raise TaskError(f'{path}:{n}: needs a non-empty "{text_field}"')
            rows.append((n, row))
    if not rows:
        raise TaskError(f"{path} holds no items: an empty {kind} task file")
    return rows


def choice_rows(
    path: str, tokenizer, limit: int, objects: list[tuple[int, dict]] | None = None
) -> tuple[list[Row], list[int]]:
    """Rows of a multiple-choice file (or of its ``objects`` already read), and each item's label."""
    rows, labels = [], []
    sop, mask = tokenizer.sop_id, tokenizer.mask_id
    for item, (n, obj) in enumerate(objects or read_jsonl(path, "choice")):
        choices, label = obj.get("choices"), obj.get("label")
        if not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise TaskError(f'{path}:{n}: needs a non-empty "text"')
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise TaskError(
                f'{path}:{n}: "choices" must be a list of at least two non-empty strings'
            )
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise TaskError(
                f'{path}:{n}: "label" {label!r} is not an index into its {len(choices)} choices'
            )
        repeated = sorted({c for c in choices if choices.count(c) > 1})
        if repeated:  # equal candidates score alike, and a tie goes to the first: the row could never be right
            raise TaskError(f'{path}:{n}: "choices" repeat {repeated}: each candidate must differ')
        part_a = tokenizer.encode(obj["text"], allow_special=True)
        blanks = [i for i, t in enumerate(part_a) if t == mask]
        if len(blanks) != 1:
            raise TaskError(
                f"{path}:{n}: the text has {len(blanks)} [MASK] blanks; a choice fills exactly one"
            )
        for c, text in enumerate(choices):
            # as a span of running text: what training shows in a blank (GPT-2's Ġword, sentencepiece's ▁word)
            ids = tokenizer.encode_running(text.strip())
            if not ids:
                raise TaskError(f"{path}:{n}: choice {c} ({text!r}) has no tokens")
            rows.append(Row(part_a, blanks[0], [sop] + ids[:-1], ids, item, c))
        labels.append(label)
    check_lengths(rows, limit, path)
    return rows, labels


def lambada_rows(path: str, tokenizer, limit: int) -> list[Row]:
    """One row per text: the context and [gMASK], then the last word teacher-forced."""
    rows = []
    for item, (n, obj) in enumerate(read_jsonl(path, "lambada")):
        text = obj["text"].rstrip()
        if " " not in text:
            raise TaskError(f"{path}:{n}: a LAMBADA text needs a context and a last word")
        context, word = text.rsplit(" ", 1)
        whole, ctx = tokenizer.encode(text), tokenizer.encode(context)
        target = (
            whole[len(ctx) :]
            if whole[: len(ctx)] == ctx and len(whole) > len(ctx)
            else tokenizer.encode(word)
        )
        part_a = ctx + [tokenizer.gmask_id]
        rows.append(
            Row(part_a, len(ctx), [tokenizer.sop_id] + target[:-1], target, item, gmask=True)
        )
    check_lengths(rows, limit, path)
    return rows


def blank_rows(path: str, tokenizer, limit: int, collator) -> list[Row]:
    """One row per span the collator's token objective blanks in each held-out document.

    A document longer than fits is cut (its Part A and its longest span must fit ``limit``); one too
    short for a blank at the objective's mask ratio is left out (``documents`` counts those scored).
    """
    rows = []
    budget = limit - collator.cfg.max_span_length - 2
    for item, (_, obj) in enumerate(read_jsonl(path, "blank")):
        ids = np.asarray(tokenizer.encode(obj["text"])[:budget], np.int64)
        plan = collator.plan(item, ids)
        # too short for the objective's mask ratio: no blank, nothing to score
        if len(plan.starts) == 0:
            continue
        part_a, places, prev = [], [], 0
        for s, length in zip(plan.starts.tolist(), plan.lengths.tolist()):
            part_a += ids[prev:s].tolist()
            places.append(len(part_a))
            part_a.append(tokenizer.mask_id)
            prev = s + length
        part_a += ids[prev:].tolist()
        for k, (s, length) in enumerate(zip(plan.starts.tolist(), plan.lengths.tolist())):
            span = ids[s : s + length].tolist()
            rows.append(
                Row(
                    part_a, places[k], [tokenizer.sop_id] + span, span + [tokenizer.eop_id], item, k
                )
            )
    if not rows:
        raise TaskError(
            f"{path}: no document is long enough for the token objective to blank a span in it"
        )
    check_lengths(rows, limit, path)
    return rows


def check_lengths(rows: list[Row], limit: int, path: str, what: str = "it") -> None:
    longest = max(rows, key=len)
    if len(longest) > limit:
        raise TaskError(
            f"{path}: item {longest.item + 1} needs {len(longest)} positions, the model has {limit}; "
            f"shorten {what} or use a model with longer positions"
        )


def metrics(
    kind: str, rows: list[Row], scores: np.ndarray, labels: list[int] | None = None
) -> dict:
    """A task's metrics from ``scores[i] = (nll sum, targets, argmax-correct targets)`` of ``rows[i]``."""
    nll, count, correct = scores[:, 0], scores[:, 1], scores[:, 2]
    if kind == "blank":
        return {
            "exact_match": float(np.mean(correct == count)),
            "token_accuracy": float(correct.sum() / count.sum()),
            # a continuous measure: it keeps falling while the discrete ones above sit between two values
            "loss": float(nll.sum() / count.sum()),
            "spans": len(rows),
            "documents": len({r.item for r in rows}),
        }
    if kind == "lambada":
        return {
            "accuracy": float(np.mean(correct == count)),
            "perplexity": math.exp(nll.sum() / count.sum()),
            "items": len(rows),
        }
    items = np.array([r.item for r in rows])
    right = {"summed": 0, "per_token": 0}
    for item, label in enumerate(labels):
        at = np.flatnonzero(items == item)
        right["summed"] += int(np.argmin(nll[at]) == label)  # the highest log-likelihood
        right["per_token"] += int(np.argmin(nll[at] / count[at]) == label)
    chance = float(np.mean([1.0 / np.sum(items == i) for i in range(len(labels))]))
    return {
        "accuracy": right["summed"] / len(labels),
        "accuracy_per_token": right["per_token"] / len(labels),
        "chance": chance,
        "items": len(labels),
    }


def blank_collator(tokenizer, seq_length: int, seed: int):
    """The collator's token objective alone: the spans a held-out document gets blanked at."""
    from megatron_glm.data.blank_infilling import (
        BlankInfillingCollator,
        BlankInfillingConfig,
        SpecialIds,
    )

    return BlankInfillingCollator(
        BlankInfillingConfig(seq_length=seq_length, token_prob=1.0, seed=seed),
        SpecialIds.from_tokenizer(tokenizer),
    )


def build(
    kind: str, path: str, tokenizer, limit: int, seed: int
) -> tuple[list[Row], list[int] | None]:
    """A task file's rows (and labels, for ``choice``), each row at most ``limit`` tokens."""
    if kind == "choice":
        return choice_rows(path, tokenizer, limit)
    if kind == "lambada":
        return lambada_rows(path, tokenizer, limit), None
    if kind == "blank":
        return blank_rows(path, tokenizer, limit, blank_collator(tokenizer, limit, seed)), None
    raise TaskError(f"unknown task kind {kind!r}: one of {', '.join(KINDS)}")


def parse_spec(text: str) -> tuple[str, str]:
    """``KIND:FILE`` -> (kind, file)."""
    kind, sep, path = text.partition(":")
    if not sep or kind not in KINDS or not path:
        raise TaskError(f"{text!r}: give KIND:FILE with KIND one of {', '.join(KINDS)}")
    return kind, path


def argparse_spec(text: str) -> tuple[str, str]:
    """``parse_spec`` as an argparse ``type`` (its error becomes the parser's usage message)."""
    import argparse

    try:
        return parse_spec(text)
    except TaskError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def task_name(kind: str, path: str) -> str:
    return f"{kind}:{os.path.basename(path)}"
