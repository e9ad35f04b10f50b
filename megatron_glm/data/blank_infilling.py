"""GLM's autoregressive blank infilling: text sample -> the batch contract.

Three objectives (the GLM paper, section 2), drawn per sample:

- token: spans of Poisson(lambda=3) length truncated to 1..39, drawn until 15% of the text is
  masked, at least one token between spans; each span becomes one ``[MASK]`` in Part A;
- sentence: whole sentences until 15% is covered, ``[sMASK]``;
- document: ``[gMASK]`` and 50-100% of the text to generate: a suffix, or, with probability
  ``1 - gpt_infill_prob`` on a one-document sample, one span anywhere (THUDM's two variants).

Part B holds the spans (shuffled): input ``[sop] s1..sn``, targets ``s1..sn [eop]``, row 0 of the
positions is the span's mask position in Part A, row 1 counts ``1..n+1``. A document suffix has
no ``[eop]`` (input ``[sop] s1..s(n-1)``, targets ``s1..sn``): the text goes on past the sample,
so there is no end to predict. Loss is on Part B. A row of ``S`` tokens holds
``L + (number of blanks) + (number of [eop])`` of them for ``L`` text tokens, so the text is cut
to fit (the span draw and the cut are solved together).

Rules kept from THUDM/GLM's ``ConstructBlockStrategy``, because they are the reference's:

- A document's end never lies inside a token or sentence span: the end-of-document token is
  never masked (THUDM asserts it is never a target), nor is the sample's last token, which may
  be cut mid-document.
- In a sample of several documents, each document but the longest takes drawn spans only while
  they stay within ``mask_ratio`` of its own length; the longest takes the rest that fit. A
  short document would otherwise lose most of its context to one span (an 8-token document
  with a share of one 3-token span is 38% masked), and a blank whose context is gone teaches
  the model nothing about filling blanks. Spans that fit nowhere are dropped (THUDM drops the
  whole sample; a fixed-size sample index cannot).
- Span places are THUDM's: sorted uniform offsets in the free length, drawn with replacement.

Deviation from the original, on purpose: the objective is drawn per sample from
``(seed, sample index)``, not once per batch, so the data does not depend on how samples are
grouped into micro-batches, and a resume with another data-parallel size reproduces it.

``packed=True`` gives each document of a sample its own segment ``[A_1 B_1 A_2 B_2 ...]``
with positions restarting and attention confined to the segment (GLM-130B style).

Speed: a sample is first *planned* (its random draws: a few scalar numpy calls, from a generator
that ``SampleGenerators`` seeds for the whole batch at once), then a whole batch of plans is laid
out by one set of vectorised array operations (``_layout``). At a few microseconds per sample,
numpy's per-call overhead is the cost that counts, so the per-sample steps make few numpy calls
(a packed sample's spans go to its documents by ``bisect`` on Python prefix sums).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from megatron_glm.data.sample_rng import SampleGenerators
from megatron_glm.flags import internal, setting

TOKEN, SENTENCE, DOCUMENT = 0, 1, 2
OBJECTIVES = ("token", "sentence", "document")


@dataclass(kw_only=True)
class BlankInfillingConfig:
    """The objective's settings: THUDM/GLM's flags and defaults (``--bert-prob`` is ``token_prob``)."""

    seq_length: int = internal()  # the data's (--seq-length)
    token_prob: float = setting(1.0, "token objective ([MASK]) probability", name="--bert-prob")
    sentence_prob: float = setting(
        0.0,
        "sentence objective ([sMASK]) probability; the rest is the document objective",
        name="--gap-sentence-prob",
    )
    mask_ratio: float = setting(0.15)
    poisson_lambda: float = setting(3.0)
    max_span_length: int = internal(39)
    sentence_ratio: float = setting(0.15, name="--gap-sentence-ratio")
    gmask_min_ratio: float = setting(
        0.5, "shortest [gMASK] span, fraction of the text", name="--gpt-min-ratio"
    )
    gmask_max_ratio: float = internal(1.0)
    gpt_infill_prob: float = setting(
        0.5,
        "document objective: probability of a suffix (no [eop]); otherwise one "
        "span anywhere in a one-document sample (with [eop]). Samples of several "
        "documents always take a suffix",
    )
    block_mask_prob: float = setting(
        0.0,
        "token objective: replace each Part B input token by [dBLOCK] with this "
        "probability (GLM-10B: 0.1)",
    )
    context_mask_ratio: float = setting(
        0.0,
        "token objective: replace this fraction of the text, among the tokens "
        "within --context-mask-range of a blank, by [dBLOCK]",
    )
    context_mask_range: int = setting(3)
    random_position: bool = setting(
        False,
        "shift the positions of a sample by a random offset, so that every position row trains",
    )
    shuffle_spans: bool = setting(
        True, "keep Part B spans in text order", name="--no-shuffle-blocks", negate=True
    )
    single_span_prob: float = setting(0.0, "token objective: one span of the whole masked length")
    short_seq_prob: float = setting(0.0, "cut the text to a uniform random length, pad the rest")
    task_mask: bool = setting(
        True,
        "[MASK] for every objective (off: [sMASK]/[gMASK] for sentence/document)",
        name="--no-task-mask",
        negate=True,
    )
    packed: bool = setting(
        False, "one segment per document (GLM-130B style)", name="--packed-segments"
    )
    seed: int = internal(1234)  # the job's (--seed)
    # the model's rotary_1d: row 0 of the positions is GLM-130B's 1D position (ModelConfig.positions_1d)
    positions_1d: bool = internal(False)

    def validate(self) -> None:
        probs = (self.token_prob, self.sentence_prob)
        if min(probs) < 0 or sum(probs) > 1 + 1e-9:
            raise ValueError(
                f"objective probabilities token {self.token_prob} + sentence {self.sentence_prob} "
                "must be non-negative and at most 1 (the rest is the document objective)"
            )
        if not 0 < self.mask_ratio < 1 or not 0 < self.sentence_ratio < 1:
            raise ValueError("mask and sentence ratios must be in (0, 1)")
        if not 0 <= self.gmask_min_ratio <= self.gmask_max_ratio <= 1:
            raise ValueError("need 0 <= gmask min ratio <= gmask max ratio <= 1")
        for name in (
            "gpt_infill_prob",
            "block_mask_prob",
            "context_mask_ratio",
            "single_span_prob",
            "short_seq_prob",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}"
                )
        if self.context_mask_range < 1:
            raise ValueError(
                f"context mask range must be at least 1, got {self.context_mask_range}"
            )
        if self.seq_length < 8:
            raise ValueError(
                f"sequence length {self.seq_length} is too short for blank infilling (>= 8)"
            )


@dataclass
class SpecialIds:
    pad: int
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    eod: int | None = None  # end of document: never masked
    dblock: int | None = None  # replaces tokens for block_mask_prob / context_mask_ratio

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        ids = tok.special_ids
        return cls(
            ids["pad"],
            ids["mask"],
            ids["smask"],
            ids["gmask"],
            ids["sop"],
            ids["eop"],
            ids.get("eos"),
            ids.get("dblock"),
        )


SENTENCE_ENDS = ".?!;:\n…。？！；："


def sentence_end_ids(tokenizer) -> np.ndarray:
    """Ids of the tokens that end a sentence: THUDM's rule, an end character anywhere in the token."""
    special = set(tokenizer.special_ids.values())
    ids = [
        i
        for i in range(tokenizer.vocab_size)
        if i not in special and any(c in SENTENCE_ENDS for c in tokenizer.decode([i]))
    ]
    return np.asarray(ids, dtype=np.int64)


@dataclass
class _Plan:
    """One sample's random draws; ``_layout`` turns a batch of them into rows."""

    text: np.ndarray  # the text tokens that go into the row (cut to fit)
    segments: np.ndarray  # segment lengths in ``text`` (one segment unless packed)
    starts: np.ndarray  # span starts in ``text``, ascending
    lengths: np.ndarray  # span lengths
    order: np.ndarray  # Part B order: span indices, grouped by segment in segment order
    mask_id: int
    objective: int
    eop: bool = True
    bias: int = 0  # added to row 0 of the positions (random_position)
    # over Part B inputs after [sop], in Part B order: -> [dBLOCK]
    block_masked: np.ndarray | None = None
    context_masked: np.ndarray | None = None  # Part A indices -> [dBLOCK]


class BlankInfillingCollator:
    """``collator([(sample_index, sample), ...])`` -> dict of torch tensors (the batch contract)."""

    def __init__(
        self,
        cfg: BlankInfillingConfig,
        special: SpecialIds,
        sentence_ends: np.ndarray | None = None,
    ):
        cfg.validate()
        if (cfg.block_mask_prob or cfg.context_mask_ratio) and special.dblock is None:
            raise ValueError(
                "--block-mask-prob and --context-mask-ratio need a [dBLOCK] token in the tokenizer"
            )
        self.cfg, self.special = cfg, special
        self.sentence_ends = (
            np.zeros(0, np.int64) if sentence_ends is None else np.asarray(sentence_ends, np.int64)
        )
        # a lookup table: is id i a sentence end? (ids past the table read its last entry, False)
        self._is_end = np.zeros(int(self.sentence_ends.max(initial=-1)) + 2, bool)
        self._is_end[self.sentence_ends] = True
        k = np.arange(1, cfg.max_span_length + 1)
        log_pmf = (
            k * math.log(cfg.poisson_lambda)
            - cfg.poisson_lambda
            - np.array([math.lgamma(x + 1) for x in k])
        )
        pmf = np.exp(log_pmf)
        self.span_cdf = np.cumsum(pmf / pmf.sum())
        # default_rng([seed, index]), a batch at a time
        self._generators = SampleGenerators(cfg.seed)
        # columns; span counts stay under S/2 + 8
        self._arange = np.arange(cfg.seq_length + 16, dtype=np.int64)

    # -- one sample's draws ----------------------------------------------------------------
    def objective_of(self, rng) -> int:
        u = rng.random()
        cfg = self.cfg
        return (
            TOKEN
            if u < cfg.token_prob
            else SENTENCE
            if u < cfg.token_prob + cfg.sentence_prob
            else DOCUMENT
        )

    def plan(self, index: int, text, document_lengths=None) -> _Plan:
        """Every random draw for one sample, deterministic from (seed, index)."""
        rng = self._generators([index])[0]
        return self._plan(rng, self.objective_of(rng), text, document_lengths)

    def plans(self, samples) -> list[_Plan]:
        """``[plan(i, ...) for i, ... in samples]``, bitwise, with less work per sample.

        One-document samples of the token objective (GLM-Base/Large's only objective) make the
        same draws in the same order as ``plan``, but everything between the draws is done for
        all of them at once (``_token_plans``) instead of sample by sample.
        """
        cfg = self.cfg
        batched = not (
            cfg.short_seq_prob
            or cfg.single_span_prob
            or cfg.random_position
            or cfg.block_mask_prob
            or cfg.context_mask_ratio
        )
        out, token = [None] * len(samples), []
        rngs = self._generators([index for index, _ in samples])
        for slot, ((_, sample), rng) in enumerate(zip(samples, rngs)):
            objective = self.objective_of(rng)
            docs = sample.get("document_lengths")
            if batched and objective == TOKEN and (docs is None or len(docs) == 1):
                token.append((slot, rng, np.asarray(sample["text"], dtype=np.int64)))
            else:
                out[slot] = self._plan(rng, objective, sample["text"], docs)
        if token:
            for (slot, _, _), p in zip(token, self._token_plans(token)):
                out[slot] = p
        return out

    def _token_plans(self, pending) -> list[_Plan]:
        """``_plan`` of one-document token-objective samples, ``pending = [(slot, rng after the objective, text)]``."""
        cfg, S = self.cfg, self.cfg.seq_length
        available = np.asarray([t.size for _, _, t in pending], np.int64)
        budget = np.minimum(available, S - 2)
        guess = (cfg.mask_ratio * budget / 2).astype(np.int64) + 8
        G = int(guess.max())
        u = np.full((len(pending), G), 2.0)  # past a row's guess: never used
        for r, (_, rng, _) in enumerate(pending):
            u[r, : guess[r]] = rng.random(int(guess[r]))
        lengths = np.minimum(
            np.searchsorted(self.span_cdf, u, side="right") + 1, cfg.max_span_length
        )
        total = np.cumsum(lengths, axis=1)
        k = np.arange(1, G + 1)
        drawn = k <= guess[:, None]
        done = (total >= cfg.mask_ratio * np.minimum(available[:, None], S - 2 * k)) & drawn
        count = np.where(done.any(axis=1), done.argmax(axis=1) + 1, guess)
        length = np.minimum(available, S - 2 * count)
        room = length - 1  # all but the sample's last token
        # sum + gaps fit
        take = (((total + k - 1) <= room[:, None]) & (k <= count[:, None])).sum(axis=1)
        kept = k <= take[:, None]
        free = room - np.where(kept, lengths, 0).sum(axis=1) - (take - 1)
        u[:] = 2.0
        orders = []
        for r, (_, rng, _) in enumerate(pending):
            u[r, : take[r]] = rng.random(int(take[r]))
            orders.append(
                rng.permutation(int(take[r])) if cfg.shuffle_spans else np.arange(take[r])
            )
        # unused ones sort last
        places = np.sort(np.floor(u * (free + 1)[:, None]).astype(np.int64), axis=1)
        starts = places + np.cumsum(lengths + 1, axis=1) - (lengths + 1)
        return [
            _Plan(
                text[: length[r]],
                np.asarray([length[r]], np.int64),
                starts[r, : take[r]],
                lengths[r, : take[r]].astype(np.int64),
                order,
                self.special.mask,
                TOKEN,
            )
            for r, ((_, _, text), order) in enumerate(zip(pending, orders))
        ]

    def _plan(self, rng, objective: int, text, document_lengths) -> _Plan:
        """The draws after the objective's, from ``rng``."""
        cfg, sp = self.cfg, self.special
        text = np.asarray(text, dtype=np.int64)
        docs = np.asarray(
            [len(text)] if document_lengths is None else document_lengths, dtype=np.int64
        )
        available = len(text)
        if cfg.short_seq_prob and rng.random() < cfg.short_seq_prob:
            available = int(rng.integers(2, max(available, 2) + 1))
        eop = True
        if objective == TOKEN:
            starts, lengths, length = self._token_spans(rng, text, available, docs)
            mask_id = sp.mask
        elif objective == SENTENCE:
            starts, lengths, length = self._sentence_spans(rng, text, available, docs)
            mask_id = sp.smask if cfg.task_mask else sp.mask
            if not starts.size:  # no sentence fits (one long run-on text): mask tokens instead
                objective, mask_id = TOKEN, sp.mask
                starts, lengths, length = self._token_spans(rng, text, available, docs)
        else:
            starts, lengths, length, eop = self._document_spans(rng, text, available, docs)
            mask_id = sp.gmask if cfg.task_mask else sp.mask
        segments = _cut(docs, length) if cfg.packed else np.asarray([length], np.int64)
        order = self._order(rng, starts, segments)
        p = _Plan(text[:length], segments, starts, lengths, order, mask_id, objective, eop)
        if objective == DOCUMENT and eop is False:
            return p  # THUDM's suffix: no position shift, no [dBLOCK]
        # THUDM: positions end at the last Part A one; shift them up to S - 1
        if cfg.random_position:
            last = int(_part_a_lengths(starts, lengths, segments)[1].max()) - 1
            if last < cfg.seq_length - 1:
                p.bias = int(rng.integers(0, cfg.seq_length - last))
        if objective == TOKEN and cfg.block_mask_prob:
            p.block_masked = rng.random(int(lengths[order].sum())) < cfg.block_mask_prob
        if objective == TOKEN and cfg.context_mask_ratio:
            masked = self._context_mask(rng, p)
            p.context_masked = masked if masked.size else None
        return p

    def _order(self, rng, starts, segments) -> np.ndarray:
        """Part B order: shuffled within each segment (one permutation per segment, in order)."""
        if not self.cfg.shuffle_spans or starts.size < 2:  # (a permutation of 0 or 1 makes no draw)
            return np.arange(starts.size)
        if segments.size == 1:
            return rng.permutation(starts.size)
        seg = segments.cumsum().searchsorted(starts, side="right")
        first = seg.searchsorted(self._arange[: segments.size + 1]).tolist()
        return np.concatenate(
            [a + rng.permutation(b - a) for a, b in zip(first[:-1], first[1:])]
        ).astype(np.int64)

    def _protected_ends(self, text, docs) -> np.ndarray:
        """1 for a document piece whose last token may not be masked: an end-of-document token, or the sample's end."""
        ends = docs.cumsum() - 1
        protect = np.zeros(docs.size, np.int64)
        if self.special.eod is not None:
            protect[:] = text[ends] == self.special.eod
        protect[-1] = 1
        return protect

    def _token_spans(self, rng, text, available: int, docs):
        """Span lengths and the text length they fit, then their places in the documents."""
        cfg, S = self.cfg, self.cfg.seq_length
        if cfg.single_span_prob and rng.random() < cfg.single_span_prob:
            length = min(available, S - 2)
            n = max(1, int(round(cfg.mask_ratio * length)))
            starts, lengths = self._place(rng, text, np.asarray([min(n, length)]), length, docs)
            return starts, lengths, length
        budget = min(available, S - 2)
        guess = int(cfg.mask_ratio * budget / 2) + 8
        lengths = self.span_cdf.searchsorted(rng.random(guess), side="right") + 1
        lengths = np.minimum(lengths, cfg.max_span_length)
        # the text that k spans leave
        text_len = np.minimum(available, S - 2 * self._arange[1 : guess + 1])
        done = lengths.cumsum() >= cfg.mask_ratio * text_len
        k = int(done.argmax()) + 1 if done.any() else guess
        length = int(min(available, S - 2 * k))
        starts, lengths = self._place(rng, text, lengths[:k], length, docs)
        return starts, lengths, length

    def _place(self, rng, text, lengths, length: int, docs):
        """Give the drawn span lengths to documents (THUDM's rule, module docstring), then places inside each."""
        docs = _cut(docs, length)
        if docs.size == 1:  # all but the sample's last token
            return self._places(
                rng, lengths[: _fitting(lengths, length - 1, gaps=True)], length - 1
            )
        room = docs - self._protected_ends(text[:length], docs)  # maskable length of each piece
        # how many of the lengths (in drawn order) each piece takes: prefix sums, searched per piece
        drawn = lengths.tolist()
        sums, with_gaps = [0], [0]  # sum of the first i lengths; and that plus i (a gap after each)
        for i, n in enumerate(drawn, 1):
            sums.append(sums[-1] + n)
            with_gaps.append(sums[-1] + i)
        pieces = room.argsort(kind="stable").tolist()
        room_of, used, counts = room.tolist(), 0, []
        for d in pieces[:-1]:  # sum within int(mask_ratio * room)
            counts.append(
                bisect_right(sums, int(room_of[d] * self.cfg.mask_ratio) + sums[used], used + 1)
                - used
                - 1
            )
            used += counts[-1]
        # the longest: sum + gaps within its room
        counts.append(
            bisect_right(with_gaps, room_of[pieces[-1]] + with_gaps[used] + 1, used + 1) - used - 1
        )
        pieces, counts = np.asarray(pieces), np.asarray(counts)
        owner = pieces.repeat(counts)  # the lengths go to the pieces in that order
        offsets = docs.cumsum() - docs
        starts, lengths = self._places(
            rng, lengths[: used + counts[-1]], room[owner], offsets[owner], counts
        )
        by_start = starts.argsort(kind="stable")
        return starts[by_start], lengths[by_start]

    @staticmethod
    def _places(rng, lengths, room, offset=None, counts=None):
        """THUDM's places: per piece, sorted uniform offsets in its free length (with replacement), spans in order.

        ``room`` and ``offset`` are per span (those of the span's piece); ``counts`` spans in a row share a piece.
        Without ``counts``, one piece from 0 whose room is the number ``room``.
        """
        u = rng.random(lengths.size)
        step = lengths + 1  # a span and the gap after it
        before = step.cumsum() - step  # tokens (span + gap) before each span
        if counts is None:  # one piece, from 0
            free = int(room - lengths.sum() - (lengths.size - 1))
            places = (u * (free + 1)).astype(np.int64)  # floor: u * (free + 1) >= 0
            places.sort()
            return places + before, lengths
        group = np.arange(counts.size).repeat(counts)
        first = (counts.cumsum() - counts).repeat(counts)
        # per piece
        total = (
            np.bincount(group, weights=step, minlength=counts.size).astype(np.int64).repeat(counts)
        )
        before -= before[first]  # within its piece
        places = (u * (room - total + 2)).astype(np.int64)  # free = room - sum - (k - 1)
        places = places[np.lexsort((places, group))]  # sorted within each piece
        return offset + places + before, lengths

    def _sentence_spans(self, rng, text, available: int, docs):
        """Whole sentences, in a random order, until ``sentence_ratio`` of the text they fit is covered."""
        cfg, S, eod = self.cfg, self.cfg.seq_length, self.special.eod
        head = text[:available]
        ends = np.take(self._is_end, head, mode="clip").nonzero()[0] + 1
        at_eod = np.zeros(0, np.int64) if eod is None else (head == eod).nonzero()[0]
        if docs.size == 1 and not at_eod.size:  # already sorted and unique
            bounds = [0] + ends.tolist()
            if bounds[-1] != available:
                bounds.append(available)
            firsts, lasts = bounds[:-1], bounds[1:]
        else:  # document ends, and an end-of-document token as a sentence of its own (never chosen)
            doc_ends = docs.cumsum()
            bounds = np.unique(
                np.concatenate(
                    [[0], ends, doc_ends[doc_ends < available], [available], at_eod, at_eod + 1]
                )
            ).tolist()
            lone_eod = set(at_eod.tolist())
            firsts, lasts = [], []
            for first, last in zip(bounds[:-1], bounds[1:]):
                if first not in lone_eod:
                    firsts.append(first)
                    lasts.append(last)
        chosen, covered, last_end = [], 0, 0
        for i in rng.permutation(len(firsts)).tolist():
            k = len(chosen)
            if covered >= cfg.sentence_ratio * min(available, S - 2 * k):
                break
            end = max(last_end, lasts[i])
            if end <= S - 2 * (k + 1) and end <= available:
                chosen.append(i)
                covered += lasts[i] - firsts[i]
                last_end = end
        length = min(available, S - 2 * len(chosen))
        chosen.sort()  # sentences are in text order
        starts = np.asarray([firsts[i] for i in chosen], np.int64)
        return starts, np.asarray([lasts[i] for i in chosen], np.int64) - starts, length

    def _document_spans(self, rng, text, available: int, docs):
        """A suffix (no [eop]) of the text, or of every document when packed; or one span anywhere (with [eop])."""
        cfg, S = self.cfg, self.cfg.seq_length
        # documents a suffix may take
        pieces = 1 if docs.size == 1 else _cut(docs, min(available, S - 1)).size
        several = pieces > 1
        suffix = several or rng.random() < cfg.gpt_infill_prob
        if not suffix:  # one long span anywhere in a one-document sample, except its last token
            length = min(available, S - 2)
            n = int(round(rng.uniform(cfg.gmask_min_ratio, cfg.gmask_max_ratio) * length))
            n = min(max(n, 1), length - 1)
            start = int(rng.integers(0, length - n))  # the last token stays in Part A
            return np.asarray([start]), np.asarray([n]), length, True
        if not (cfg.packed and several):
            length = min(available, S - 1)
            n = int(round(rng.uniform(cfg.gmask_min_ratio, cfg.gmask_max_ratio) * length))
            n = min(max(n, 1), length)
            return np.asarray([length - n]), np.asarray([n]), length, False
        # packed: a suffix of every document, each its own segment; each costs one [gMASK]
        length = min(available, S - pieces)
        segments = _cut(docs, length)
        ratio = rng.uniform(cfg.gmask_min_ratio, cfg.gmask_max_ratio, segments.size)
        n = np.clip(np.round(ratio * segments).astype(np.int64), 1, segments)
        return np.cumsum(segments) - n, n, length, False

    def _context_mask(self, rng, p: _Plan) -> np.ndarray:
        """Part A tokens within ``context_mask_range`` of a blank; as many as ``context_mask_ratio`` of the text.

        THUDM's candidates are the tokens next to a blank plus the last ones of the text (a slip,
        it seems: they are next to nothing); here they are only the tokens next to a blank.
        Indices count through the Part As of the segments one after the other.
        """
        seg, a_seg = _part_a_lengths(p.starts, p.lengths, p.segments)
        a_off = np.cumsum(a_seg) - a_seg
        local = _mask_positions(p.starts, p.lengths, p.segments)
        r = self.cfg.context_mask_range
        near = local[:, None] + np.r_[-r:0, 1 : r + 1][None, :]
        valid = (near >= 0) & (near < a_seg[seg][:, None])
        near = (near + a_off[seg][:, None])[valid]
        candidates = np.setdiff1d(near, local + a_off[seg])  # sorted, unique, not a blank itself
        count = min(int(self.cfg.context_mask_ratio * p.text.size), candidates.size)
        return np.sort(rng.choice(candidates, count, replace=False)) if count else candidates[:0]

    # -- rows ---------------------------------------------------------------------------------
    def encode(self, index: int, text, document_lengths=None) -> dict:
        """The row arrays of one sample (numpy): tokens, labels, loss_mask, pos0, pos1, attn_lo, attn_hi, objective."""
        out = self._layout([self.plan(index, text, document_lengths)])
        return {k: (v[0] if k != "objective" else int(v[0])) for k, v in out.items()}

    def _layout(self, plans: list[_Plan], runs_only: bool = False) -> dict:
        """Lay out a batch of plans as ``[B, S]`` arrays.

        A row of one segment and one span (the document objective's) is a few slices
        (``_layout_one_span``); the others go through one pass of vectorised operations over
        all of them (``_layout_runs``). ``runs_only`` sends every row there (for the tests).
        """
        S, B = self.cfg.seq_length, len(plans)
        out = self._blank(B)
        one = (
            []
            if runs_only
            else [
                b
                for b, p in enumerate(plans)
                if p.starts.size == 1
                and p.segments.size == 1
                and p.block_masked is None
                and p.context_masked is None
            ]
        )
        chosen = set(one)
        rest = [b for b in range(B) if b not in chosen]
        if rest:
            self._layout_runs([plans[b] for b in rest], np.asarray(rest, np.int64), out)
        for b in one:
            self._layout_one_span(plans[b], b, out)
        tokens, labels, pos0, pos1, lo, hi = out
        if self.cfg.positions_1d:
            # GLM-130B's 1D positions: a [gMASK] span continues from its blank (the blank's position + 1, 2,
            # ...: Part A's count goes on when the blank ends it), a [MASK] or [sMASK] span stays at its blank's
            continues = np.asarray([p.mask_id == self.special.gmask for p in plans])
            pos0 = pos0 + pos1 * np.repeat(continues, S)
        shape = (B, S)
        return {
            "tokens": tokens.reshape(shape),
            "labels": labels.reshape(shape),
            "loss_mask": (pos1 > 0).astype(np.float32).reshape(shape),
            "pos0": pos0.reshape(shape),
            "pos1": pos1.reshape(shape),
            "attn_lo": lo.reshape(shape),
            "attn_hi": hi.reshape(shape),
            "objective": np.asarray([p.objective for p in plans], np.int64),
        }

    def _layout_one_span(self, p: _Plan, b: int, out) -> None:
        """Row ``b`` for a plan of one segment and one span, by slices: ``A = text[:s] [blank] text[s+n:]``, then
        ``[sop] text[s:s+m-1]`` with labels ``text[s:s+n] ([eop])``."""
        S, sp = self.cfg.seq_length, self.special
        tokens, labels, pos0, pos1, lo, hi = (a[b * S : (b + 1) * S] for a in out)
        text, s, n = p.text, int(p.starts[0]), int(p.lengths[0])
        a = text.size - n + 1  # Part A, the blank included
        m = n + int(p.eop)  # Part B
        used, ar = a + m, self._arange
        tokens[:s] = text[:s]
        tokens[s] = p.mask_id
        tokens[s + 1 : a] = text[s + n :]
        tokens[a] = sp.sop
        tokens[a + 1 : used] = text[s : s + m - 1]
        labels[a : a + n] = text[s : s + n]
        if p.eop:
            labels[a + n] = sp.eop
        pos0[:a] = ar[:a] + p.bias
        pos0[a:used] = s + p.bias
        pos1[a:used] = ar[1 : m + 1]
        lo[:used] = 0
        hi[:a] = a

    def _layout_runs(self, plans: list[_Plan], rows: np.ndarray, out) -> None:
        """Rows ``rows`` of ``out`` for these plans, in one pass of vectorised operations.

        Everything is computed per segment or per span (small arrays) and spread over tokens with
        ``np.repeat``: a segment's Part A, and each span's Part B block, are runs of consecutive
        columns, so a destination is a run's first column plus a running index.
        """
        S, sp, B = self.cfg.seq_length, self.special, len(plans)
        sizes = np.asarray(
            [
                (p.text.size, p.segments.size, p.starts.size, p.eop, p.bias, p.mask_id)
                for p in plans
            ],
            np.int64,
        )
        text_len, n_seg, n_span, eop, bias, mask_id = sizes.T
        text = np.concatenate([p.text for p in plans])
        seg_len = np.concatenate([p.segments for p in plans])
        starts = np.concatenate([p.starts for p in plans]).astype(np.int64)
        lengths = np.concatenate([p.lengths for p in plans]).astype(np.int64)
        span_base = np.cumsum(n_span) - n_span
        order = np.concatenate([p.order for p in plans]).astype(np.int64) + np.repeat(
            span_base, n_span
        )
        seg_row = np.repeat(np.arange(B), n_seg)
        span_row = np.repeat(np.arange(B), n_span)
        seg_end = np.cumsum(seg_len)
        starts += np.repeat(np.cumsum(text_len) - text_len, n_span)  # into the batch's text
        span_seg = np.searchsorted(seg_end, starts, side="right")
        # Part A: the text with each span's tokens after the first dropped, the first becoming the blank
        dropped = lengths - 1
        keep = np.ones(text.size, bool)
        drop_first = np.cumsum(dropped) - dropped
        keep[np.repeat(starts + 1 - drop_first, dropped) + np.arange(int(dropped.sum()))] = False
        kept = np.flatnonzero(keep)
        a_len = seg_len - np.bincount(span_seg, weights=dropped, minlength=seg_len.size).astype(
            np.int64
        )
        a_first = np.cumsum(a_len) - a_len  # in ``kept``
        # where each segment starts in its row: Part A then Part B, segment after segment
        block = lengths[order] + eop[span_row[order]]  # Part B tokens of each span, in Part B order
        b_len = np.bincount(span_seg[order], weights=block, minlength=seg_len.size).astype(np.int64)
        total = a_len + b_len
        seg_first = np.cumsum(n_seg) - n_seg
        excl = np.cumsum(total) - total
        cursor = excl - np.repeat(excl[seg_first], n_seg)
        assert (cursor + total <= S).all(), "a plan does not fit its row"
        seg_col0 = rows[seg_row] * S + cursor  # flat index of each segment's first column

        tokens, labels, pos0, pos1, lo, hi = out
        dest = np.repeat(seg_col0 - a_first, a_len) + np.arange(kept.size)
        tokens[dest] = text[kept]
        # a segment's columns [cursor, cursor + total) all attend from its first column; its Part A sees all of its
        # Part A, and Part B keeps hi = column + 1
        # a segment per row, from column 0: whole rows at once, cheaper than scattering
        if seg_len.size == B:
            col, a_end = self._arange[:S], a_len[:, None]
            part_a = col < a_end
            lo.reshape(-1, S)[rows] = np.where(col < total[:, None], 0, col)
            hi.reshape(-1, S)[rows] = np.where(part_a, a_end, col + 1)
            pos0.reshape(-1, S)[rows] = np.where(part_a, col + bias[:, None], 0)
        else:
            seg_col_first = np.cumsum(total) - total
            lo[np.repeat(seg_col0 - seg_col_first, total) + np.arange(int(total.sum()))] = (
                np.repeat(cursor, total)
            )
            pos0[dest] = np.arange(kept.size) - np.repeat(a_first - bias[seg_row], a_len)
            hi[dest] = np.repeat(cursor + a_len, a_len)
        seg_text0 = seg_end - seg_len
        mask_pos = starts - seg_text0[span_seg] - (drop_first - _first_of(drop_first, span_seg))
        tokens[seg_col0[span_seg] + mask_pos] = mask_id[span_row]
        for b, p in enumerate(plans):
            if p.context_masked is not None:  # Part A indices of the plan, segment after segment
                segs = slice(seg_first[b], seg_first[b] + n_seg[b])
                ends = np.cumsum(a_len[segs])
                g = np.searchsorted(ends, p.context_masked, side="right")
                tokens[seg_col0[segs][g] + p.context_masked - (ends - a_len[segs])[g]] = sp.dblock

        # Part B: block j holds [sop] s1..s(n-1) [sn], labels s1..sn [eop]
        o_seg = span_seg[order]
        b_first = np.cumsum(block) - block
        b_col0 = seg_col0[o_seg] + a_len[o_seg] + b_first - _first_of(b_first, o_seg)
        run = np.arange(int(block.sum()))
        dest = np.repeat(b_col0 - b_first, block) + run
        src = np.repeat(starts[order] - 1 - b_first, block) + run  # text index of each input token
        src[b_first] = 0  # the [sop], set below
        b_tok = text[src]
        ends_eop = eop[span_row[order]] == 1
        b_last = b_col0 + block - 1
        last_label = np.where(ends_eop, sp.eop, text[starts[order] + lengths[order] - 1])
        if any(p.block_masked is not None for p in plans):
            after_sop = np.ones(run.size, bool)
            after_sop[b_first] = False
            after_sop &= np.repeat(ends_eop, block)
            drop = np.concatenate(
                [
                    p.block_masked
                    if p.block_masked is not None
                    else np.zeros(int(p.lengths.sum()), bool)
                    for p in plans
                    if p.eop
                ]
            )
            true_next = b_tok.copy()  # labels are the true tokens, whatever the inputs show
            b_tok[np.flatnonzero(after_sop)[drop]] = sp.dblock
        else:
            true_next = b_tok
        tokens[dest] = b_tok
        tokens[b_col0] = sp.sop
        labels[dest[:-1]] = true_next[1:]  # within a block, a label is the next input token ...
        # ... but for the block's last, which is [eop] or the suffix's last token
        labels[b_last] = last_label
        pos0[dest] = np.repeat(mask_pos[order] + bias[span_row[order]], block)
        pos1[dest] = run - np.repeat(b_first - 1, block)

    def _blank(self, B: int):
        """Fresh flat rows of padding: tokens, labels, pos0, pos1, attn_lo, attn_hi (padding attends to itself)."""
        S = self.cfg.seq_length
        if getattr(self, "_blank_rows", None) is None or self._blank_rows[0].size != B * S:
            col = np.tile(np.arange(S, dtype=np.int32), B)
            self._blank_rows = (np.full(B * S, self.special.pad, np.int64), col, col + 1)
        pad, col, col1 = self._blank_rows
        zeros = lambda: np.zeros(B * S, np.int64)  # noqa: E731  (calloc'd: cheaper than a copy)
        return pad.copy(), zeros(), zeros(), zeros(), col.copy(), col1.copy()

    # -- a batch -------------------------------------------------------------------------
    def __call__(self, samples) -> dict:
        """``samples``: ``[(sample_index, {"text", "document_lengths"}), ...]``."""
        import torch

        rows = self._layout(self.plans(samples))
        return {
            "tokens": torch.from_numpy(rows["tokens"]),
            "labels": torch.from_numpy(rows["labels"]),
            "loss_mask": torch.from_numpy(rows["loss_mask"]),
            "position_ids": torch.from_numpy(np.stack([rows["pos0"], rows["pos1"]], axis=1)),
            "attn_lo": torch.from_numpy(rows["attn_lo"]),
            "attn_hi": torch.from_numpy(rows["attn_hi"]),
            "objective": torch.from_numpy(rows["objective"]),
        }


def _first_of(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``values`` at the first element of each element's group (groups are runs of equal, ascending ids)."""
    return values[np.searchsorted(group, group)] if values.size else values


def _part_a_lengths(starts, lengths, segments):
    """The segment of each span, and the Part A length of each segment."""
    seg = np.searchsorted(np.cumsum(segments), starts, side="right")
    removed = np.bincount(seg, weights=lengths - 1, minlength=segments.size).astype(np.int64)
    return seg, segments - removed


def _mask_positions(starts, lengths, segments) -> np.ndarray:
    """Index in its segment's Part A of each span's blank."""
    seg = np.searchsorted(np.cumsum(segments), starts, side="right")
    seg_start = (np.cumsum(segments) - segments)[seg]
    collapsed = np.cumsum(lengths - 1) - (lengths - 1)  # tokens removed before each span
    first = np.searchsorted(seg, seg)  # first span of the same segment
    return starts - seg_start - (collapsed - collapsed[first])


def _fitting(lengths: np.ndarray, room: int, gaps: bool) -> int:
    """How many of ``lengths``, in order, fit in ``room`` (with a token between spans when ``gaps``)."""
    need = np.cumsum(lengths)
    if gaps:
        need += np.arange(lengths.size)
    return int(np.searchsorted(need, room, side="right"))


def _cut(docs: np.ndarray, length: int) -> np.ndarray:
    """Document lengths of the first ``length`` tokens (the last one shortened, empty ones dropped)."""
    if docs.size == 1 and docs[0] > 0:
        return docs if docs[0] <= length else np.asarray([length], np.int64)
    ends = np.minimum(np.cumsum(docs), length)
    ends[1:] -= ends[:-1].copy()
    return ends[ends > 0]
