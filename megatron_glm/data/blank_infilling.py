"""GLM's autoregressive blank infilling: text sample -> the batch contract (DESIGN.md).

Three objectives (REFERENCE.md section 1), drawn per sample:

- token: spans of Poisson(lambda=3) length truncated to 1..39, drawn until 15% of the text is
  masked, at least one token between spans, spread over the documents of the sample in
  proportion to their lengths; each span becomes one ``[MASK]`` in Part A;
- sentence: whole sentences until 15% is covered, ``[sMASK]``;
- document: one suffix of 50-100% of the text, ``[gMASK]``.

Part B holds the spans (shuffled): input ``[sop] s1..sn``, targets ``s1..sn [eop]``, row 0 of the
positions is the span's mask position in Part A, row 1 counts ``1..n+1``. Loss is on Part B.
A row of ``S`` tokens holds ``L + 2k`` of them for ``L`` text tokens and ``k`` spans, so the
text is cut to ``L = S - 2k`` (the span draw and the cut are solved together).

Deviation from the original, on purpose: the objective is drawn per sample from
``(seed, sample index)``, not once per batch, so the data does not depend on how samples are
grouped into micro-batches, and a resume with another data-parallel size reproduces it.

``packed=True`` gives each document of a sample its own segment ``[A_1 B_1 A_2 B_2 ...]``
with positions restarting and attention confined to the segment (GLM-130B style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOKEN, SENTENCE, DOCUMENT = 0, 1, 2
OBJECTIVES = ("token", "sentence", "document")


@dataclass
class BlankInfillingConfig:
    seq_length: int
    token_prob: float = 1.0  # the reference's bert_prob
    sentence_prob: float = 0.0  # gap_sentence_prob; the rest is the document objective
    mask_ratio: float = 0.15
    poisson_lambda: float = 3.0
    max_span_length: int = 39
    sentence_ratio: float = 0.15
    gmask_min_ratio: float = 0.5
    gmask_max_ratio: float = 1.0
    shuffle_spans: bool = True
    single_span_prob: float = 0.0  # token objective: one span of the whole masked length
    short_seq_prob: float = 0.0  # cut the text to a uniform random length, pad the rest
    task_mask: bool = True  # [sMASK]/[gMASK] for sentence/document; off: [MASK] for all
    packed: bool = False
    seed: int = 1234

    def validate(self) -> None:
        probs = (self.token_prob, self.sentence_prob)
        if min(probs) < 0 or sum(probs) > 1 + 1e-9:
            raise ValueError(f"objective probabilities token {self.token_prob} + sentence {self.sentence_prob} "
                             "must be non-negative and at most 1 (the rest is the document objective)")
        if not 0 < self.mask_ratio < 1 or not 0 < self.sentence_ratio < 1:
            raise ValueError("mask and sentence ratios must be in (0, 1)")
        if not 0 <= self.gmask_min_ratio <= self.gmask_max_ratio <= 1:
            raise ValueError("need 0 <= gmask min ratio <= gmask max ratio <= 1")
        if self.seq_length < 8:
            raise ValueError(f"sequence length {self.seq_length} is too short for blank infilling (>= 8)")


@dataclass
class SpecialIds:
    pad: int
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        return cls(tok.pad_id, tok.mask_id, tok.smask_id, tok.gmask_id, tok.sop_id, tok.eop_id)


SENTENCE_ENDS = ".?!;:\n。？！；："


def sentence_end_ids(tokenizer) -> np.ndarray:
    """Ids of the tokens that end a sentence (their text ends in . ? ! ; : or a CJK one, or holds a newline)."""
    special = set(tokenizer.special_ids.values())
    ids = []
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        piece = tokenizer.decode([i])
        if piece and (piece.rstrip(" ")[-1:] in SENTENCE_ENDS or "\n" in piece):
            ids.append(i)
    return np.asarray(ids, dtype=np.int64)


class BlankInfillingCollator:
    """``collator([(sample_index, sample), ...])`` -> dict of torch tensors (the batch contract)."""

    def __init__(self, cfg: BlankInfillingConfig, special: SpecialIds, sentence_ends: np.ndarray | None = None):
        cfg.validate()
        self.cfg, self.special = cfg, special
        self.sentence_ends = np.zeros(0, np.int64) if sentence_ends is None else np.asarray(sentence_ends)
        k = np.arange(1, cfg.max_span_length + 1)
        log_pmf = k * math.log(cfg.poisson_lambda) - cfg.poisson_lambda - np.array([math.lgamma(x + 1) for x in k])
        pmf = np.exp(log_pmf)
        self.span_cdf = np.cumsum(pmf / pmf.sum())

    # -- one sample ----------------------------------------------------------------------
    def objective_of(self, rng) -> int:
        u = rng.random()
        return TOKEN if u < self.cfg.token_prob else SENTENCE if u < self.cfg.token_prob + self.cfg.sentence_prob else DOCUMENT

    def encode(self, index: int, text, document_lengths=None) -> dict:
        """The row arrays for one sample, deterministic from (seed, index)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, int(index)])
        text = np.asarray(text, dtype=np.int64)
        docs = np.asarray([len(text)] if document_lengths is None else document_lengths, dtype=np.int64)
        objective = self.objective_of(rng)
        available = len(text)
        if cfg.short_seq_prob and rng.random() < cfg.short_seq_prob:
            available = int(rng.integers(2, max(available, 2) + 1))
        if objective == TOKEN:
            spans, length = self._token_spans(rng, available, docs)
            mask_id = self.special.mask
        elif objective == SENTENCE:
            spans, length = self._sentence_spans(rng, text, available, docs)
            mask_id = self.special.smask if cfg.task_mask else self.special.mask
            if not spans:  # no sentence fits (one long run-on text): mask tokens instead
                objective, mask_id = TOKEN, self.special.mask
                spans, length = self._token_spans(rng, available, docs)
        else:
            spans, length = self._document_spans(rng, available, docs)
            mask_id = self.special.gmask if cfg.task_mask else self.special.mask
        return self._assemble(rng, text[:length], _cut(docs, length), spans, mask_id, objective)

    def _token_spans(self, rng, available: int, docs):
        """Span lengths and the text length they fit, then their places in the documents."""
        cfg, S = self.cfg, self.cfg.seq_length
        budget = min(available, S - 2)
        if cfg.single_span_prob and rng.random() < cfg.single_span_prob:
            length = min(available, S - 2)
            n = max(1, int(round(cfg.mask_ratio * length)))
            return self._place(rng, np.asarray([min(n, length)]), length, docs), length
        guess = int(cfg.mask_ratio * budget / 2) + 8
        lengths = np.searchsorted(self.span_cdf, rng.random(guess), side="right") + 1
        lengths = np.minimum(lengths, cfg.max_span_length)
        total = np.cumsum(lengths)
        k = np.arange(1, guess + 1)
        text_len = np.minimum(available, S - 2 * k)
        done = np.flatnonzero(total >= cfg.mask_ratio * text_len)
        k = int(done[0]) + 1 if done.size else guess
        length = int(min(available, S - 2 * k))
        return self._place(rng, lengths[:k], length, docs), length

    def _place(self, rng, lengths, length: int, docs) -> list[tuple[int, int]]:
        """Spread spans over the documents in proportion to their lengths; places uniform within each."""
        docs = _cut(docs, length)
        starts = np.concatenate([[0], np.cumsum(docs)[:-1]])
        share = lengths.size * docs / max(docs.sum(), 1)
        count = np.floor(share).astype(np.int64)
        for d in np.argsort(-(share - count), kind="stable")[: lengths.size - count.sum()]:
            count[d] += 1
        spans, used = [], 0
        for d in range(docs.size):
            mine = np.sort(lengths[used : used + count[d]])[::-1]  # longest first: dropped first if too many
            used += count[d]
            while mine.size and mine.sum() + mine.size - 1 > docs[d]:  # does not fit this document
                mine = mine[1:]
            if not mine.size:
                continue
            mine = rng.permutation(mine)
            kd = mine.size
            free = int(docs[d] - mine.sum() - (kd - 1))
            gaps = np.sort(rng.choice(free + kd, kd, replace=False)) - np.arange(kd)
            begins = starts[d] + gaps + np.cumsum(mine) - mine + np.arange(kd)
            spans.extend(zip(begins.tolist(), mine.tolist()))
        return spans

    def _sentence_spans(self, rng, text, available: int, docs):
        cfg, S = self.cfg, self.cfg.seq_length
        ends = np.flatnonzero(np.isin(text[:available], self.sentence_ends)) + 1
        doc_ends = np.cumsum(docs)
        bounds = np.unique(np.concatenate([[0], ends, doc_ends[doc_ends < available], [available]]))
        sentences = [(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        chosen, covered, last_end = [], 0, 0
        for i in rng.permutation(len(sentences)):
            k = len(chosen)
            if covered >= cfg.sentence_ratio * min(available, S - 2 * k):
                break
            start, n = sentences[i]
            end = max(last_end, start + n)
            if end <= S - 2 * (k + 1) and end <= available:
                chosen.append((start, n))
                covered += n
                last_end = end
        length = min(available, S - 2 * len(chosen))
        return sorted(chosen), length

    def _document_spans(self, rng, available: int, docs):
        cfg, S = self.cfg, self.cfg.seq_length
        segments = _cut(docs, min(available, S - 2)) if cfg.packed else None
        if segments is None or segments.size <= 1:
            length = min(available, S - 2)
            n = int(round(rng.uniform(cfg.gmask_min_ratio, cfg.gmask_max_ratio) * length))
            n = min(max(n, 1), length)
            return [(length - n, n)], length
        # packed: a suffix of every document, each its own segment
        k = segments.size
        length = min(available, S - 2 * k)
        segments = _cut(docs, length)
        spans, start = [], 0
        for d in segments:
            if d > 0:
                n = min(max(int(round(rng.uniform(cfg.gmask_min_ratio, cfg.gmask_max_ratio) * d)), 1), int(d))
                spans.append((int(start + d - n), n))
            start += int(d)
        return spans, length

    def _assemble(self, rng, text, docs, spans, mask_id: int, objective: int) -> dict:
        cfg, S, sp = self.cfg, self.cfg.seq_length, self.special
        row = {name: np.zeros(S, np.int64) for name in ("tokens", "labels", "pos0", "pos1")}
        row["loss_mask"] = np.zeros(S, np.float32)
        lo, hi = np.arange(S, dtype=np.int32), np.arange(1, S + 1, dtype=np.int32)  # padding: itself
        row["tokens"][:] = sp.pad
        segments = (
            [(int(a), int(b)) for a, b in zip(np.r_[0, np.cumsum(docs)[:-1]], np.cumsum(docs))]
            if cfg.packed else [(0, len(text))]
        )
        cursor = 0
        for seg_start, seg_end in segments:
            seg_text = text[seg_start:seg_end]
            if seg_text.size == 0:
                continue
            seg = np.asarray([(s - seg_start, n) for s, n in spans if seg_start <= s < seg_end], np.int64)
            seg = seg.reshape(-1, 2)
            starts, lengths = seg[:, 0], seg[:, 1]
            # Part A: each span collapses to its mask token
            cover = np.zeros(seg_text.size + 1, np.int64)
            np.add.at(cover, starts, 1)
            np.add.at(cover, starts + lengths, -1)
            inside = np.cumsum(cover[:-1]) > 0
            part_a = seg_text.copy()
            part_a[starts] = mask_id
            keep = ~inside
            keep[starts] = True
            part_a = part_a[keep]
            a_len = part_a.size
            mask_pos = starts - (np.cumsum(lengths - 1) - (lengths - 1))
            a = slice(cursor, cursor + a_len)
            row["tokens"][a], row["pos0"][a] = part_a, np.arange(a_len)
            lo[a], hi[a] = cursor, cursor + a_len
            # Part B: [sop] s1..sn -> s1..sn [eop], one block per span, blocks in shuffled order
            order = rng.permutation(len(starts)) if cfg.shuffle_spans else np.arange(len(starts))
            s_o, n_o = starts[order], lengths[order]
            total = int((n_o + 1).sum())
            block = np.repeat(np.arange(order.size), n_o + 1)
            t = np.arange(total) - np.repeat(np.cumsum(n_o + 1) - (n_o + 1), n_o + 1)
            src = np.repeat(s_o, n_o + 1) + t
            b = slice(cursor + a_len, cursor + a_len + total)
            row["tokens"][b] = np.where(t == 0, sp.sop, seg_text[np.maximum(src - 1, 0)])
            row["labels"][b] = np.where(t == n_o[block], sp.eop, seg_text[np.minimum(src, seg_text.size - 1)])
            row["loss_mask"][b] = 1.0
            row["pos0"][b] = mask_pos[order][block]
            row["pos1"][b] = t + 1
            lo[b] = cursor
            hi[b] = np.arange(b.start + 1, b.stop + 1)
            cursor = b.stop
        row["attn_lo"], row["attn_hi"], row["objective"] = lo, hi, objective
        return row

    # -- a batch -------------------------------------------------------------------------
    def __call__(self, samples) -> dict:
        """``samples``: ``[(sample_index, {"text", "document_lengths"}), ...]``."""
        import torch

        rows = [self.encode(i, s["text"], s.get("document_lengths")) for i, s in samples]
        stack = lambda key: np.stack([r[key] for r in rows])  # noqa: E731
        return {
            "tokens": torch.from_numpy(stack("tokens")),
            "labels": torch.from_numpy(stack("labels")),
            "loss_mask": torch.from_numpy(stack("loss_mask")),
            "position_ids": torch.from_numpy(np.stack([stack("pos0"), stack("pos1")], axis=1)),
            "attn_lo": torch.from_numpy(stack("attn_lo")),
            "attn_hi": torch.from_numpy(stack("attn_hi")),
            "objective": torch.tensor([r["objective"] for r in rows]),
        }


def _cut(docs: np.ndarray, length: int) -> np.ndarray:
    """Document lengths of the first ``length`` tokens (the last one shortened, empty ones dropped)."""
    ends = np.minimum(np.cumsum(docs), length)
    cut = np.diff(np.r_[0, ends])
    return cut[cut > 0]
