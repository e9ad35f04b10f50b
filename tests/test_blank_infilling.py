"""The blank-infilling collator against the paper's definition, independently re-derived here."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_glm.data.blank_infilling import (
    DOCUMENT,
    SENTENCE,
    TOKEN,
    BlankInfillingCollator,
    BlankInfillingConfig,
    SpecialIds,
)

SP = SpecialIds(pad=0, mask=1, smask=2, gmask=3, sop=4, eop=5)
PERIOD = 6  # a sentence end token in the synthetic text
BLANKS = {SP.mask, SP.smask, SP.gmask}


def segments_of(row, S):
    """Split a row into segments by its attention bounds; returns [(start, sep, end)] (end excludes padding)."""
    lo, hi = row["attn_lo"], row["attn_hi"]
    out, i = [], 0
    while i < S:
        if (
            hi[i] == i + 1
            and lo[i] == i
            and row["tokens"][i] == SP.pad
            and row["loss_mask"][i] == 0
        ):
            i += 1  # padding row
            continue
        start = lo[i]
        sep = hi[i]
        j = start
        while (
            j < S
            and lo[j] == start
            and not (
                row["tokens"][j] == SP.pad
                and row["loss_mask"][j] == 0
                and hi[j] == j + 1
                and lo[j] == j
            )
        ):
            j += 1
        out.append((start, sep, j))
        i = j
    return out


def reconstruct(row, start, sep, end):
    """Put each Part B span back into its blank, using only the row's tokens and positions.

    A span ends with [eop], except a document objective's suffix, which runs to its segment's end.
    """
    part_a = list(row["tokens"][start:sep])
    spans = {}
    i = sep
    while i < end:
        assert row["tokens"][i] == SP.sop and row["pos1"][i] == 1
        mask_pos = row["pos0"][i]
        n = 0
        while i + n + 1 < end and row["pos1"][i + n + 1] == n + 2:
            n += 1
        span_labels = row["labels"][i : i + n + 1]
        assert list(row["tokens"][i + 1 : i + n + 1]) == list(span_labels[:-1]), (
            "inputs are targets shifted by one"
        )
        assert (row["pos0"][i : i + n + 1] == mask_pos).all()
        if span_labels[-1] == SP.eop:
            spans[mask_pos] = list(span_labels[:-1])
        else:  # a suffix: the document objective's, the segment's last blank and last block
            assert row["objective"] == DOCUMENT and i + n + 1 == end
            assert mask_pos == max(k for k, t in enumerate(row["tokens"][start:sep]) if t in BLANKS)
            spans[mask_pos] = list(span_labels)
        i += n + 1
    assert sorted(spans) == [k for k, t in enumerate(part_a) if t in BLANKS], "one span per blank"
    text = []
    for k, t in enumerate(part_a):
        text.extend(spans[k] if t in BLANKS else [t])
    return text


def check_row(row, text, docs, cfg):
    S = cfg.seq_length
    segs = segments_of(row, S)
    rebuilt = []
    for start, sep, end in segs:
        rebuilt += reconstruct(row, start, sep, end)
        # Part A: bidirectional over Part A, positions 0.., block positions 0, no loss
        assert (row["attn_lo"][start:sep] == start).all() and (
            row["attn_hi"][start:sep] == sep
        ).all()
        assert (row["pos0"][start:sep] == np.arange(sep - start)).all() and (
            row["pos1"][start:sep] == 0
        ).all()
        assert (row["loss_mask"][start:sep] == 0).all()
        # Part B: causal, plus all of Part A; loss everywhere
        assert (row["attn_lo"][sep:end] == start).all() and (
            row["attn_hi"][sep:end] == np.arange(sep, end) + 1
        ).all()
        assert (row["loss_mask"][sep:end] == 1).all()
    used = len(rebuilt)
    assert rebuilt == list(text[:used]), "Part A plus the spans give back the text"
    used_end = segs[-1][2] if segs else 0
    assert (row["tokens"][used_end:] == SP.pad).all() and (row["loss_mask"][used_end:] == 0).all()
    if cfg.packed:
        doc_ends = set(np.cumsum(docs).tolist())
        assert all(sum(e - s for s, _, e in segs[: k + 1]) >= 0 for k in range(len(segs)))
        # each segment's text lies in one document
        pos = 0
        for start, sep, end in segs:
            length = len(reconstruct(row, start, sep, end))
            first_end = next(e for e in sorted(doc_ends) if e > pos)
            assert pos + length <= first_end
            pos += length
    return used


texts = st.integers(20, 400).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(7, 99), min_size=n, max_size=n),
        st.lists(st.integers(1, n), min_size=0, max_size=4),
    )
)


@settings(max_examples=150, deadline=None)
@given(
    data=texts,
    S=st.sampled_from([64, 128, 512]),
    token=st.floats(0, 1),
    packed=st.booleans(),
    shuffle=st.booleans(),
    index=st.integers(0, 10**6),
    short=st.sampled_from([0.0, 0.5]),
)
def test_rows_follow_the_definition(data, S, token, packed, shuffle, index, short):
    values, cuts = data
    text = np.asarray(values)
    text[::9] = PERIOD
    cut = sorted(set(cuts))
    docs = np.diff([0] + [c for c in cut if c < len(text)] + [len(text)])
    cfg = BlankInfillingConfig(
        seq_length=S,
        token_prob=token,
        sentence_prob=(1 - token) / 2,
        packed=packed,
        shuffle_spans=shuffle,
        short_seq_prob=short,
    )
    collate = BlankInfillingCollator(cfg, SP, np.array([PERIOD]))
    row = collate.encode(index, text, docs)
    check_row(row, text, docs, cfg)
    again = collate.encode(index, text, docs)
    assert all(np.array_equal(row[k], again[k]) for k in row if k != "objective"), (
        "deterministic per index"
    )


def test_token_objective_statistics():
    """15% masked (one span of overshoot at most), span lengths ~ Poisson(3) truncated to 1..39."""
    S, lam = 512, 3.0
    collate = BlankInfillingCollator(BlankInfillingConfig(seq_length=S), SP)
    rng = np.random.default_rng(0)
    lengths, fractions = [], []
    for i in range(400):
        text = rng.integers(7, 99, S)
        row = collate.encode(i, text, None)
        a_end = int(row["attn_hi"][0])
        blanks = int(np.isin(row["tokens"][:a_end], list(BLANKS)).sum())
        masked = int(row["loss_mask"].sum()) - blanks  # each span adds its [eop] target
        used = a_end - blanks + masked
        fractions.append(masked / used)
        starts = np.flatnonzero(row["tokens"] == SP.sop)
        ends = list(starts[1:]) + [int(row["loss_mask"].nonzero()[0][-1]) + 1]
        lengths += [e - s - 1 for s, e in zip(starts, ends)]
        assert used + 2 * blanks <= S
    # truncated Poisson mean: sum k p(k) / sum p(k) over k = 1..39 (computed here, not by the collator)
    pmf = [lam**k * math.exp(-lam) / math.factorial(k) for k in range(1, 40)]
    mean = sum(k * p for k, p in zip(range(1, 40), pmf)) / sum(pmf)
    assert abs(np.mean(lengths) - mean) < 0.15, (np.mean(lengths), mean)
    assert min(lengths) >= 1 and max(lengths) <= 39
    assert 0.15 <= np.mean(fractions) < 0.15 + mean / S * 3
    assert min(fractions) >= 0.15


def test_sentence_and_document_objectives():
    S = 256
    rng = np.random.default_rng(1)
    sent = BlankInfillingCollator(
        BlankInfillingConfig(seq_length=S, token_prob=0.0, sentence_prob=1.0),
        SP,
        np.array([PERIOD]),
    )
    doc = BlankInfillingCollator(
        BlankInfillingConfig(seq_length=S, token_prob=0.0, sentence_prob=0.0, gpt_infill_prob=1.0),
        SP,
    )
    ratios = []
    for i in range(200):
        text = rng.integers(7, 99, S)
        text[rng.choice(S, 20, replace=False)] = PERIOD
        row = sent.encode(i, text, None)
        assert row["objective"] == SENTENCE and SP.smask in row["tokens"]
        sep = int(row["attn_hi"][0])
        # each span is whole sentences: ends at a period
        for s in np.flatnonzero(row["tokens"] == SP.sop):
            span = row["labels"][s : s + 1 + np.argmax(row["labels"][s:] == SP.eop)]
            assert span[-1] == PERIOD or s + len(span) >= sep, (
                "a masked sentence ends at a sentence end"
            )
        row = doc.encode(i, text, None)
        assert row["objective"] == DOCUMENT
        sep = int(row["attn_hi"][0])
        assert (
            row["tokens"][sep - 1] == SP.gmask and (row["tokens"][:sep] == SP.gmask).sum() == 1
        ), "one suffix"
        n = int(row["loss_mask"].sum())
        assert SP.eop not in row["labels"], "a suffix has no [eop]: the text goes on"
        assert list(row["labels"][sep : sep + n]) == list(text[sep - 1 : sep - 1 + n])
        assert sep - 1 + n == S - 1, "the suffix fills the row but for its [gMASK]"
        ratios.append(n / (sep - 1 + n))
        assert (row["pos0"][sep : sep + n] == sep - 1).all(), (
            "all generated tokens at the [gMASK] position"
        )
    assert 0.5 - 0.01 <= min(ratios) and max(ratios) <= 1.0 and abs(np.mean(ratios) - 0.75) < 0.03


def test_document_objective_infill_variant():
    """--gpt-infill-prob: a suffix with that probability, else one span of 50-100% anywhere, with [eop].

    Several documents always give a suffix (THUDM's rule); the span anywhere never takes the last token.
    """
    S, n_rows = 128, 600
    cfg = BlankInfillingConfig(seq_length=S, token_prob=0.0, sentence_prob=0.0, gpt_infill_prob=0.3)
    collate = BlankInfillingCollator(cfg, SP)
    rng = np.random.default_rng(3)
    suffixes, starts, ratios = 0, [], []
    for i in range(n_rows):
        text = rng.integers(7, 99, S)
        row = collate.encode(i, text, None)
        sep = int(row["attn_hi"][0])
        n = int(row["loss_mask"].sum())
        if SP.eop not in row["labels"]:
            suffixes += 1
            continue
        blank = int(np.flatnonzero(row["tokens"][:sep] == SP.gmask)[0])
        assert (row["tokens"][:sep] == SP.gmask).sum() == 1
        span = list(row["labels"][sep : sep + n - 1])
        assert row["labels"][sep + n - 1] == SP.eop and len(span) == n - 1
        assert list(row["tokens"][:blank]) + span + list(row["tokens"][blank + 1 : sep]) == list(
            text[: sep - 1 + n - 1]
        )
        assert blank + len(span) < sep - 1 + len(span), "the text's last token is never in the span"
        starts.append(blank / (sep - 1))  # where the blank sits in Part A, 0..1
        ratios.append(len(span) / (sep - 1 + len(span)))
    frac = suffixes / n_rows
    sigma = math.sqrt(0.3 * 0.7 / n_rows)
    assert abs(frac - 0.3) < 4 * sigma, frac
    assert 0.49 <= min(ratios) and max(ratios) < 1.0 and abs(np.mean(ratios) - 0.75) < 0.03
    assert max(starts) > 0.1, "the span is not always a suffix"
    many = collate.encode(5, rng.integers(7, 99, S), np.array([60, 68]))
    assert SP.eop not in many["labels"], "several documents: a suffix"


def test_objective_mixture_and_batch_contract():
    import torch

    cfg = BlankInfillingConfig(seq_length=64, token_prob=0.5, sentence_prob=0.3, task_mask=False)
    collate = BlankInfillingCollator(cfg, SP, np.array([PERIOD]))
    rng = np.random.default_rng(2)
    samples = [
        (i, {"text": rng.integers(7, 99, 64), "document_lengths": np.array([30, 34])})
        for i in range(600)
    ]
    batch = collate(samples)
    assert batch["tokens"].shape == (600, 64) and batch["position_ids"].shape == (600, 2, 64)
    assert batch["attn_lo"].dtype == torch.int32 and batch["loss_mask"].dtype == torch.float32
    counts = np.bincount(batch["objective"].numpy(), minlength=3) / 600
    assert abs(counts[TOKEN] - 0.5) < 0.06 and abs(counts[DOCUMENT] - 0.2) < 0.06
    assert not ((batch["tokens"] == SP.smask) | (batch["tokens"] == SP.gmask)).any(), (
        "task masks off: [MASK] only"
    )
    # the same sample index gives the same row whatever batch it lands in
    single = collate([samples[17]])
    assert torch.equal(single["tokens"][0], batch["tokens"][17])


@pytest.mark.parametrize(
    "bad",
    [
        dict(token_prob=0.8, sentence_prob=0.5),
        dict(mask_ratio=1.5),
        dict(gmask_min_ratio=0.9, gmask_max_ratio=0.5),
        dict(seq_length=4),
    ],
)
def test_bad_configurations(bad):
    with pytest.raises(ValueError):
        BlankInfillingCollator(BlankInfillingConfig(**{"seq_length": 64, **bad}), SP)


EOD, DBLOCK = 90, 91
SPE = SpecialIds(pad=0, mask=1, smask=2, gmask=3, sop=4, eop=5, eod=EOD, dblock=DBLOCK)


def packed_sample(rng, lengths):
    """Documents of these lengths, each ending in the end-of-document token, as a sample of their total length."""
    docs = [np.r_[rng.integers(7, 89, n - 1), EOD] for n in lengths]
    return np.concatenate(docs), np.asarray(lengths)


def masked_positions(row, S):
    """Text positions inside a span, from the row alone (the spans put back in their blanks)."""
    start, sep, end = segments_of(row, S)[0]
    part_a = list(row["tokens"][start:sep])
    rebuilt, masked = reconstruct(row, start, sep, end), []
    pos = 0
    spans = {}
    i = sep
    while i < end:  # span lengths by blank position
        n = 0
        while i + n + 1 < end and row["pos1"][i + n + 1] == n + 2:
            n += 1
        spans[row["pos0"][i]] = n if row["labels"][i + n] == SP.eop else n + 1
        i += n + 1
    for k, t in enumerate(part_a):
        if t in BLANKS:
            masked += range(pos, pos + spans[k])
            pos += spans[k]
        else:
            pos += 1
    return rebuilt, masked


def test_document_ends_are_never_masked_and_short_documents_keep_their_context():
    """THUDM's rules: no end-of-document token and no sample-final token in a span; a document that is not the
    sample's longest loses at most mask_ratio of its tokens (THUDM measured 1.9% for 8 tokens, 3.2% for 16)."""
    S, rng = 256, np.random.default_rng(4)
    collate = BlankInfillingCollator(BlankInfillingConfig(seq_length=S), SPE)
    short = {8: [], 16: []}
    for i in range(500):
        first = int(rng.choice([8, 16]))
        text, docs = packed_sample(rng, [first, 40, S - first - 40])
        row = collate.encode(i, text, docs)
        rebuilt, masked = masked_positions(row, S)
        used = len(rebuilt)
        assert not any(text[p] == EOD for p in masked), "an end-of-document token was masked"
        assert used - 1 not in masked, "the sample's last token was masked"
        cut = np.cumsum(docs)
        masked = np.asarray(masked, int)
        short[first].append(np.sum(masked < first) / first)
        assert np.sum((masked >= cut[0]) & (masked < cut[1])) <= int(0.15 * 39), (
            "the middle document over its cap"
        )
        assert np.sum(masked < first) <= int(0.15 * (first - 1))
    assert np.mean(short[8]) < 0.05 and np.mean(short[16]) < 0.1, {
        k: np.mean(v) for k, v in short.items()
    }


def test_block_mask_prob_replaces_part_b_inputs_only():
    """--block-mask-prob: each Part B input after [sop] becomes [dBLOCK] with that probability; targets stay."""
    S, p = 128, 0.3
    collate = BlankInfillingCollator(BlankInfillingConfig(seq_length=S, block_mask_prob=p), SPE)
    plain = BlankInfillingCollator(BlankInfillingConfig(seq_length=S), SPE)
    rng = np.random.default_rng(5)
    hits = total = 0
    for i in range(300):
        text = rng.integers(7, 89, S)
        row, ref = collate.encode(i, text), plain.encode(i, text)
        sep = int(row["attn_hi"][0])
        assert np.array_equal(row["labels"], ref["labels"]) and np.array_equal(
            row["tokens"][:sep], ref["tokens"][:sep]
        )
        b = np.flatnonzero(row["loss_mask"] > 0)
        inputs = b[row["tokens"][b] != SP.sop]
        changed = row["tokens"][inputs] != ref["tokens"][inputs]
        assert (row["tokens"][inputs][changed] == DBLOCK).all()
        assert not (row["tokens"][b][row["tokens"][b] == SP.sop] == DBLOCK).any()
        hits, total = hits + int(changed.sum()), total + inputs.size
    assert abs(hits / total - p) < 4 * math.sqrt(p * (1 - p) / total), hits / total


def test_context_mask_ratio_hides_part_a_next_to_blanks():
    S, ratio, r = 256, 0.05, 3
    collate = BlankInfillingCollator(
        BlankInfillingConfig(seq_length=S, context_mask_ratio=ratio), SPE
    )
    plain = BlankInfillingCollator(BlankInfillingConfig(seq_length=S), SPE)
    rng = np.random.default_rng(6)
    for i in range(200):
        text = rng.integers(7, 89, S)
        row, ref = collate.encode(i, text), plain.encode(i, text)
        sep = int(row["attn_hi"][0])
        a = row["tokens"][:sep]
        changed = np.flatnonzero(a != ref["tokens"][:sep])
        assert (a[changed] == DBLOCK).all()
        blanks = np.flatnonzero(np.isin(a, list(BLANKS)))
        assert all(np.min(np.abs(blanks - c)) <= r for c in changed), "only tokens next to a blank"
        text_len = sep - blanks.size + int(row["loss_mask"].sum()) - blanks.size
        assert changed.size == int(ratio * text_len)
        assert np.array_equal(row["tokens"][sep:], ref["tokens"][sep:]) and np.array_equal(
            row["labels"], ref["labels"]
        )


def test_random_position_shifts_part_a_positions_uniformly():
    S = 64
    collate = BlankInfillingCollator(BlankInfillingConfig(seq_length=S, random_position=True), SP)
    plain = BlankInfillingCollator(BlankInfillingConfig(seq_length=S), SP)
    rng = np.random.default_rng(7)
    shifts = []
    for i in range(400):
        text = rng.integers(7, 99, 40)  # shorter than the row: room to shift
        row, ref = collate.encode(i, text), plain.encode(i, text)
        used = row["loss_mask"] > 0
        used[: int(row["attn_hi"][0])] = True
        shift = row["pos0"][used] - ref["pos0"][used]
        assert (shift == shift[0]).all() and np.array_equal(row["pos1"], ref["pos1"])
        assert row["pos0"].max() <= S - 1
        shifts.append(int(shift[0]))
        last = int(ref["attn_hi"][0]) - 1
        assert 0 <= shift[0] <= S - 1 - last
    assert min(shifts) == 0 and len(set(shifts)) > 10


def test_sentence_ends_anywhere_in_a_token():
    """THUDM's rule: a token ends a sentence if it holds . ? ! ; : a newline or an ellipsis anywhere."""
    from megatron_glm.data.blank_infilling import sentence_end_ids

    class Pieces:
        pieces = ["the", ".", "dog", '?"', "...", "a.b", "\u2026", "\n\n", "x;", "\u3002", "end"]
        special_ids = {"pad": 11}
        vocab_size = 12

        def decode(self, ids):
            return "[pad]" if ids[0] == 11 else self.pieces[ids[0]]

    assert sentence_end_ids(Pieces()).tolist() == [1, 3, 4, 5, 6, 7, 8, 9]


@settings(max_examples=60, deadline=None)
@given(
    data=texts,
    S=st.sampled_from([64, 128, 512]),
    token=st.sampled_from([1.0, 0.6, 0.0]),
    packed=st.booleans(),
    shuffle=st.booleans(),
    first=st.integers(0, 10**6),
    several=st.booleans(),
)
def test_a_batch_equals_its_samples_one_by_one(data, S, token, packed, shuffle, first, several):
    """``collator(batch)`` (batched draws for one-document token samples) is bitwise ``encode`` per sample, and
    the slice layout of one-span rows is bitwise the vectorised one."""
    values, cuts = data
    text = np.asarray(values)
    text[::9] = PERIOD
    cfg = BlankInfillingConfig(
        seq_length=S,
        token_prob=token,
        sentence_prob=(1 - token) / 2,
        packed=packed,
        shuffle_spans=shuffle,
    )
    collate = BlankInfillingCollator(cfg, SP, np.array([PERIOD]))
    docs = [None, np.array([len(text)])]
    if several and len(text) > 30:
        docs.append(np.array([len(text) - 25, 25]))
    samples = [
        (first + j, {"text": np.roll(text, j), "document_lengths": docs[j % len(docs)]})
        for j in range(6)
    ]
    batch = collate(samples)
    plans = collate.plans(samples)
    sliced, runs = collate._layout(plans), collate._layout(plans, runs_only=True)
    assert all(np.array_equal(sliced[k], runs[k]) for k in runs), (
        "the one-span slices differ from the runs"
    )
    for j, (index, s) in enumerate(samples):
        row = collate.encode(index, s["text"], s["document_lengths"])
        assert np.array_equal(batch["tokens"][j].numpy(), row["tokens"]), j
        assert np.array_equal(batch["labels"][j].numpy(), row["labels"]), j
        assert np.array_equal(batch["position_ids"][j, 0].numpy(), row["pos0"]), j
        assert np.array_equal(batch["position_ids"][j, 1].numpy(), row["pos1"]), j
        assert np.array_equal(batch["attn_hi"][j].numpy(), row["attn_hi"]), j
        assert np.array_equal(batch["attn_lo"][j].numpy(), row["attn_lo"]), j
        assert int(batch["objective"][j]) == row["objective"]
