"""Tokenizers: one rule for the GLM special tokens over every backend, round trips, padding."""

import json

import pytest

from megatron_glm.data.tokenizer import (
    SPECIAL_TOKENS,
    GLMTokenizer,
    TokenizerError,
    TokenizerSpec,
    load_tokenizer,
)

TEXT = "Return the number of items in a container.\n\n  Raises  ValueError if  empty."
ROLES = list(SPECIAL_TOKENS)


def check_common(tok: GLMTokenizer):
    ids = [tok.special_ids[r] for r in ROLES]
    assert len(set(ids)) == len(ids), "every special role needs its own id"
    assert all(0 <= i < tok.vocab_size for i in ids)
    for tp in (1, 2, 4, 8):
        padded = tok.padded_vocab_size(tp)
        assert padded % (128 * tp) == 0 and tok.vocab_size <= padded < tok.vocab_size + 128 * tp
    # specials are recognised in prompts, never in raw text; decode spells them canonically
    prompt = "Paris is the [MASK] of France. [gMASK]"
    with_special = tok.encode(prompt, allow_special=True)
    assert tok.mask_id in with_special and tok.gmask_id in with_special
    assert not set(tok.encode(prompt)) & (set(ids) - {tok.unk_id}), (
        "raw text may only produce [unk]"
    )
    assert tok.decode([tok.sop_id]) == "[sop]" and tok.decode([tok.eop_id]) == "[eop]"
    assert tok.eod_id == tok.eos_id
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    # glm-preprocess's arrays are encode_batch's ids
    texts = [TEXT, "", "unicode: héllo ✓ 漢字", prompt]
    arrays = tok.encode_arrays(texts)
    assert all(a.ndim == 1 and a.dtype.kind == "i" for a in arrays)
    assert [a.tolist() for a in arrays] == tok.encode_batch(texts)


def test_sentencepiece_from_glm_train_tokenizer(tokenizer, corpus):
    check_common(tokenizer)
    assert tokenizer.spec.type == "sentencepiece"
    assert tokenizer.vocab_size == tokenizer.base_vocab_size == 1500, (
        "trained models hold all specials"
    )
    for text in corpus[1][:300] + [TEXT, "unicode: héllo ✓ 漢字 \t tabs"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    prompt = "The [sMASK] is here. [MASK]"
    assert tokenizer.decode(tokenizer.encode(prompt, allow_special=True)) == prompt


def test_sentencepiece_arrays_without_numpy_output(spm_model, corpus):
    """sentencepiece before 0.2.1 returns lists only: the arrays are the same ids."""
    tok = load_tokenizer(model=spm_model)
    texts = corpus[1][:50] + [""]
    fast = [a.tolist() for a in tok.encode_arrays(texts)]
    tok._base._numpy = False
    assert [a.tolist() for a in tok.encode_arrays(texts)] == fast == tok.encode_batch(texts)


@pytest.fixture(scope="module")
def trained_bpe(tmp_path_factory, corpus):
    """A byte-level BPE trained here (no network), saved both as tokenizer.json and GPT-2 files."""
    tokenizers = pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("hf")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus[1][:500], vocab_size=600, special_tokens=["<|endoftext|>"])
    bpe.save(str(root / "tokenizer.json"))
    bpe.save_model(str(root))
    return root


def test_hf_tokenizer_json(trained_bpe):
    tok = load_tokenizer(model=str(trained_bpe / "tokenizer.json"))
    assert tok.spec.type == "hf"
    check_common(tok)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    # <|endoftext|> is reused as eos; every other role is appended in the fixed role order
    saved = json.loads((trained_bpe / "tokenizer.json").read_text())
    eot = next(t["id"] for t in saved["added_tokens"] if t["content"] == "<|endoftext|>")
    assert tok.eos_id == eot
    appended = [r for r in ROLES if r != "eos"]
    base = tok.base_vocab_size
    assert [tok.special_ids[r] for r in appended] == list(range(base, base + len(appended)))
    # a folder holding tokenizer.json loads the same tokenizer
    assert load_tokenizer(model=str(trained_bpe)).special_ids == tok.special_ids


def test_gpt2_vocab_and_merges(trained_bpe):
    tok = load_tokenizer(
        vocab_file=str(trained_bpe / "vocab.json"), merge_file=str(trained_bpe / "merges.txt")
    )
    assert tok.spec.type == "gpt2"
    check_common(tok)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    same = load_tokenizer(model=str(trained_bpe / "tokenizer.json"))
    assert tok.encode(TEXT) == same.encode(TEXT) and tok.special_ids == same.special_ids


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory):
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "##s", "##ed", ".", ","]
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    return str(path)


def test_bert_wordpiece(bert_vocab):
    tok = load_tokenizer(vocab_file=bert_vocab)
    assert tok.spec.type == "bert"
    check_common(tok)
    # BERT's own spellings are reused...
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    # ...and the GLM-only ones appended after the 16 base ids, in role order
    assert [tok.smask_id, tok.gmask_id, tok.sop_id, tok.eop_id, tok.eos_id, tok.dblock_id] == [
        16,
        17,
        18,
        19,
        20,
        21,
    ]
    assert tok.vocab_size == 22 and tok.padded_vocab_size(2) == 256
    assert tok.encode("The cats sat.") == [5, 6, 12, 7, 14]  # the cat ##s sat .
    assert tok.decode(tok.encode("the dogs sat on a mat.")) == "the dogs sat on a mat."
    cased = load_tokenizer(TokenizerSpec(type="BertWordPieceCase", vocab_file=bert_vocab))
    assert cased.spec.type == "bert-cased" and cased.encode("The") == [cased.unk_id]


def test_fingerprint_tracks_the_files(bert_vocab, tmp_path):
    a = load_tokenizer(vocab_file=bert_vocab)
    other = tmp_path / "vocab.txt"
    other.write_text(open(bert_vocab).read() + "extra\n")
    b = load_tokenizer(vocab_file=str(other))
    assert a.fingerprint() == load_tokenizer(vocab_file=bert_vocab).fingerprint() != b.fingerprint()
    json.dumps(a.describe())  # recorded beside preprocessed data


@pytest.mark.parametrize(
    "spec, message",
    [
        (TokenizerSpec(), "no tokenizer given"),
        (TokenizerSpec(model="/nonexistent/spm.model"), "not found"),
        (TokenizerSpec(type="wordlevel", model=__file__), "unknown tokenizer type"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(TokenizerError, match=message):
        spec.resolved()


def test_gpt2_needs_merges(trained_bpe):
    with pytest.raises(TokenizerError, match="--merge-file"):
        TokenizerSpec(type="gpt2", vocab_file=str(trained_bpe / "vocab.json")).resolved()


def test_train_tokenizer_cli_keeps_an_existing_model(spm_model, corpus, capsys):
    from megatron_glm.data_prep.train_tokenizer import main

    before = open(spm_model, "rb").read()
    prefix = spm_model[: -len(".model")]
    assert main(["--input", corpus[0], "--model-prefix", prefix, "--vocab-size", "500"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert open(spm_model, "rb").read() == before
    assert main(["--input", "/nonexistent/*.jsonl", "--model-prefix", prefix + "2"]) == 1
    assert "matches no file" in capsys.readouterr().err


# -- THUDM's rule beside special tokens ------------------------------------------------------------
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "cats", "number", "seconds"]


@pytest.fixture(scope="module")
def spm_default_normalizer(tmp_path_factory, corpus):
    """sentencepiece with its default normalizer (extra whitespace removed), unlike glm-train-tokenizer's."""
    import sentencepiece

    root = tmp_path_factory.mktemp("spm-default")
    sentencepiece.SentencePieceTrainer.train(
        input=_plain_text(corpus, root),
        model_prefix=str(root / "spm"),
        vocab_size=600,
        num_threads=1,
        minloglevel=2,
    )
    return str(root / "spm.model")


def _plain_text(corpus, root) -> str:
    path = root / "text.txt"
    path.write_text("\n".join(corpus[1][:500]))
    return str(path)


@pytest.fixture(scope="module")
def every_kind(spm_model, spm_default_normalizer, trained_bpe, bert_vocab):
    return {
        "sentencepiece (extra whitespace kept)": load_tokenizer(model=spm_model),
        "sentencepiece (default normalizer)": load_tokenizer(model=spm_default_normalizer),
        "gpt2": load_tokenizer(
            vocab_file=str(trained_bpe / "vocab.json"), merge_file=str(trained_bpe / "merges.txt")
        ),
        "bert": load_tokenizer(vocab_file=bert_vocab),
    }


KINDS = [
    "sentencepiece (extra whitespace kept)",
    "sentencepiece (default normalizer)",
    "gpt2",
    "bert",
]


@pytest.mark.parametrize("kind", KINDS)
def test_a_blank_encodes_to_the_pieces_training_shows(every_kind, kind):
    """A word of running text replaced by [MASK] (whatever the spaces around it): the text's own ids with that
    word's ids replaced by the blank, as the collator lays out a blank; decode spells it one way."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tok = every_kind[kind]
    spaces = st.sampled_from(["", " ", "  ", "\n", " \t "])

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from(WORDS), min_size=2, max_size=6), st.data())
    def check(words, data):
        j = data.draw(st.integers(0, len(words) - 1))
        full = tok.encode(" ".join(words))
        before = tok.encode(" ".join(words[:j])) if j else []
        through = tok.encode(" ".join(words[: j + 1]))
        assert full[: len(through)] == through and through[: len(before)] == before
        expected = before + [tok.mask_id] + full[len(through) :]
        left = data.draw(spaces) if j else ""
        right = data.draw(spaces.filter(bool)) if j < len(words) - 1 else data.draw(spaces)
        text = " ".join(words[:j]) + left + "[MASK]" + right + " ".join(words[j + 1 :])
        ids = tok.encode(text, allow_special=True)
        assert ids == expected, (text, ids, expected)
        assert tok.encode(tok.decode(ids), allow_special=True) == ids
        if (
            kind != "gpt2"
        ):  # a word glued to the blank is still a word (GPT-2 spells it without its space)
            glued = " ".join(words[:j]) + "[MASK]" + " ".join(words[j + 1 :])
            assert tok.encode(glued, allow_special=True) == expected

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_decode_spells_text_beside_special_tokens_one_way(every_kind, kind):
    tok = every_kind[kind]
    for variants in (
        ["number [MASK] seconds", "number[MASK] seconds", "number  [MASK]   seconds"],
        ["[gMASK] the cat [sop]", "[gMASK]  the cat[sop]"],
    ):
        spelled = {tok.decode(tok.encode(v, allow_special=True)) for v in variants}
        assert len(spelled) == 1, spelled
        canonical = spelled.pop()
        assert tok.encode(canonical, allow_special=True) == tok.encode(
            variants[0], allow_special=True
        )


@pytest.mark.parametrize("kind", KINDS)
def test_a_choice_is_scored_as_the_words_it_stands_for_in_running_text(every_kind, kind, tmp_path):
    """glm-eval's candidate ids are the ids the words have in the text with the blank filled."""
    from megatron_glm.data.eval_tasks import choice_rows

    tok = every_kind[kind]
    path = tmp_path / "task.jsonl"
    path.write_text(
        json.dumps({"text": "the cat [MASK] on the mat", "choices": ["sat", "dog"], "label": 0})
    )
    rows, _ = choice_rows(str(path), tok, 64)
    for row, word in zip(rows, ["sat", "dog"]):
        filled = tok.encode(f"the cat {word} on the mat")
        start = len(tok.encode("the cat"))
        assert row.targets == filled[start : start + len(row.targets)]
        assert tok.encode(f"the cat {word}") == filled[:start] + row.targets
