"""One tokenizer interface over sentencepiece models and Hugging Face ``tokenizers`` files.

GLM needs ten special tokens, and THUDM's ``[dBLOCK]`` for its decoder-mask options. Every backend gets them by the same
rule, so ids never depend on which code path loaded the tokenizer: for each role, in the
fixed order of ``SPECIAL_TOKENS``, reuse the base vocabulary's token if it has one under a
known spelling (BERT's ``[MASK]``, GPT-2's ``<|endoftext|>``, sentencepiece's ``<unk>``...),
otherwise append the canonical spelling after the base vocabulary. Plain ``encode`` never
produces a special token from raw text (a corpus that contains the string "[MASK]" stays
text); ``encode(..., allow_special=True)`` recognises the spellings, for prompts.

The embedding table is padded to a multiple of 128 x TP (Megatron's rule), reported by
``padded_vocab_size``; the extra rows are never produced by the tokenizer.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Sequence

from megatron_glm.flags import add_flags, read_flags, setting

# role -> spellings recognised in a base vocabulary; the first is the canonical one we append.
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "pad": ("[pad]", "[PAD]", "<pad>"),
    "cls": ("[CLS]", "<cls>"),
    "mask": ("[MASK]", "<mask>"),
    "smask": ("[sMASK]",),
    "gmask": ("[gMASK]",),
    "sop": ("[sop]", "<|startofpiece|>"),
    "eop": ("[eop]", "<|endofpiece|>"),
    "eos": ("[eos]", "</s>", "<|endoftext|>", "<eos>"),
    "unk": ("[unk]", "[UNK]", "<unk>"),
    "sep": ("[sep]", "[SEP]", "<sep>"),
    # THUDM's decoder mask: replaces tokens under --block-mask-prob / --context-mask-ratio. Last, so
    # that adding it moved no other id.
    "dblock": ("[dBLOCK]",),
}

TOKENIZER_TYPES = ("auto", "sentencepiece", "hf", "bert", "bert-cased", "gpt2")
MEGATRON_TYPE_NAMES = {
    "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece",
    "HuggingFaceTokenizer": "hf",
    "BertWordPieceLowerCase": "bert",
    "BertWordPieceCase": "bert-cased",
    "GPT2BPETokenizer": "gpt2",
}


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded as given (missing file, unknown type)."""


def pad_vocab(size: int, tensor_parallel_size: int = 1, multiple: int = 128) -> int:
    """``size`` rounded up to ``multiple * tensor_parallel_size`` (Megatron's padding)."""
    step = multiple * tensor_parallel_size
    return -(-size // step) * step


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec:
    """How to load a tokenizer (the tokenizer flags): small and picklable, so worker processes load their own."""

    type: str = setting(
        "auto",
        f"one of {', '.join(TOKENIZER_TYPES)} (Megatron names such as "
        "SentencePieceTokenizer are accepted); auto infers it from the files",
        name="--tokenizer-type",
    )
    model: str | None = setting(
        None,
        "sentencepiece .model, or Hugging Face tokenizer.json (or its folder)",
        name="--tokenizer-model",
    )
    vocab_file: str | None = setting(
        None, "BERT vocab.txt, or GPT-2 vocab.json (with --merge-file)"
    )
    merge_file: str | None = setting(None, "GPT-2 merges.txt")

    def resolved(self) -> "TokenizerSpec":
        """The spec with ``auto`` replaced by the type its files imply, files checked to exist."""
        kind = MEGATRON_TYPE_NAMES.get(self.type, self.type)
        if kind not in TOKENIZER_TYPES:
            raise TokenizerError(
                f"unknown tokenizer type {self.type!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
            )
        model = self.model
        if model and os.path.isdir(model):
            model = os.path.join(model, "tokenizer.json")
        for path in (model, self.vocab_file, self.merge_file):
            if path and not os.path.isfile(path):
                raise TokenizerError(f"tokenizer file {path} not found")
        if kind == "auto":
            if model:
                kind = "hf" if model.endswith(".json") else "sentencepiece"
            elif self.vocab_file and self.merge_file:
                kind = "gpt2"
            elif self.vocab_file:
                kind = "bert"
            else:
                raise TokenizerError(
                    "no tokenizer given: pass --tokenizer-model (sentencepiece .model or tokenizer.json), "
                    "--vocab-file (BERT vocab.txt), or --vocab-file and --merge-file (GPT-2)"
                )
        needs = {
            "sentencepiece": ("model",),
            "hf": ("model",),
            "bert": ("vocab_file",),
            "bert-cased": ("vocab_file",),
            "gpt2": ("vocab_file", "merge_file"),
        }[kind]
        values = {"model": model, "vocab_file": self.vocab_file, "merge_file": self.merge_file}
        missing = [
            f"--{n.replace('_', '-').replace('model', 'tokenizer-model')}"
            for n in needs
            if not values[n]
        ]
        if missing:
            raise TokenizerError(f"tokenizer type {kind} needs {' and '.join(missing)}")
        return TokenizerSpec(
            type=kind, model=model, vocab_file=self.vocab_file, merge_file=self.merge_file
        )

    def files(self) -> list[str]:
        return [p for p in (self.model, self.vocab_file, self.merge_file) if p]


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    add_flags(parser.add_argument_group("tokenizer"), TokenizerSpec)


def spec_from_args(args) -> TokenizerSpec:
    return read_flags(TokenizerSpec, args).resolved()


class _SentencePiece:
    def __init__(self, path: str):
        import sentencepiece

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(
                f"{path} is not a sentencepiece model ({str(e).strip()[:160]}): the file is "
                "corrupt or of another kind; pass the .model glm-train-tokenizer wrote"
            ) from None
        self.size = self.sp.get_piece_size()
        try:  # sentencepiece >= 0.2.1 hands back buffers: no Python int per token
            self.sp.encode(["a"], num_threads=1, return_type="numpy")
            self._numpy = True
        except (TypeError, ValueError):
            self._numpy = False

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=1)

    def encode_arrays(self, texts: Sequence[str]) -> list:
        if self._numpy:
            return self.sp.encode(list(texts), num_threads=1, return_type="numpy")
        import numpy as np

        return [np.asarray(ids, np.int32) for ids in self.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


class _HuggingFace:
    def __init__(self, spec: TokenizerSpec):
        import tokenizers

        try:
            if spec.type == "hf":
                tok = tokenizers.Tokenizer.from_file(spec.model)
            elif spec.type in ("bert", "bert-cased"):
                tok = tokenizers.BertWordPieceTokenizer(
                    spec.vocab_file, lowercase=spec.type == "bert"
                )._tokenizer
            else:
                tok = tokenizers.ByteLevelBPETokenizer(spec.vocab_file, spec.merge_file)._tokenizer
        except Exception as e:  # the tokenizers library raises plain Exception on unparsable files
            raise TokenizerError(
                f"{spec.files()} cannot be read as a {spec.type} tokenizer "
                f"({str(e).strip()[:160]}): the file is corrupt or of another kind"
            ) from None
        tok.encode_special_tokens = True  # raw text never turns into a special token
        self.tok = tok
        self.size = tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list:
        import numpy as np

        return [np.asarray(ids, np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


_PROBE = "a"  # a word every base vocabulary spells as its own token(s)


class GLMTokenizer:
    """A base tokenizer plus the GLM special tokens, with ids fixed by the rule above."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec.resolved()
        self._base = (
            _SentencePiece(self.spec.model)
            if self.spec.type == "sentencepiece"
            else _HuggingFace(self.spec)
        )
        self.base_vocab_size = self._base.size
        self.special_ids: dict[str, int] = {}
        self._added: dict[int, str] = {}  # ids appended after the base vocabulary
        for role, spellings in SPECIAL_TOKENS.items():
            found = next((i for i in map(self._base.token_to_id, spellings) if i is not None), None)
            if found is None:
                found = self.base_vocab_size + len(self._added)
                self._added[found] = spellings[0]
            self.special_ids[role] = found
        self.vocab_size = self.base_vocab_size + len(self._added)
        # decode spells every special token the same way, whether the base vocabulary had it or not
        self._spelling = {i: SPECIAL_TOKENS[r][0] for r, i in self.special_ids.items()}
        spelled = sorted(
            {s for spellings in SPECIAL_TOKENS.values() for s in spellings}, key=len, reverse=True
        )
        self._special_re = re.compile("(" + "|".join(map(re.escape, spelled)) + ")")
        self._id_of_spelling = {
            s: self.special_ids[r] for r, sp in SPECIAL_TOKENS.items() for s in sp
        }

    # special ids as attributes: tok.mask_id, tok.eos_id, ...
    def __getattr__(self, name: str) -> int:
        ids = self.__dict__.get("special_ids")
        if ids is not None and name.endswith("_id") and name[:-3] in ids:
            return ids[name[:-3]]
        raise AttributeError(name)

    @property
    def eod_id(self) -> int:
        """End of document, appended by ``glm-preprocess --append-eod``."""
        return self.special_ids["eos"]

    def padded_vocab_size(self, tensor_parallel_size: int = 1, multiple: int = 128) -> int:
        """Vocabulary rounded up to ``multiple * tensor_parallel_size`` (Megatron's padding)."""
        return pad_vocab(self.vocab_size, tensor_parallel_size, multiple)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """The base tokenizer's ids; with ``allow_special`` the special spellings become their ids, by THUDM's
        rule beside them: whitespace before a special token is dropped, and text after one that starts
        with whitespace is a word of running text, as training shows a word after a blank (``▁seconds``;
        not ``▁ ▁second s`` from a sentencepiece model that keeps extra whitespace)."""
        if not allow_special:
            return self._base.encode_batch([text])[0]
        ids: list[int] = []
        parts = self._special_re.split(text)
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._id_of_spelling[part])
                continue
            if k < len(parts) - 1:
                part = part.rstrip()
            if k > 0 and part[:1].isspace():
                ids.extend(self.encode_running(part.lstrip()))
            elif part:
                ids.extend(self._base.encode_batch([part])[0])
        return ids

    def encode_running(self, text: str) -> list[int]:
        """``text`` as a word of running text (after a space) tokenizes: what training shows after a blank and
        in one. Tokenized behind a probe word whose ids are then dropped (the base tokenizers split at
        whitespace first); a tokenizer that merges across it encodes ``text`` alone."""
        if not text:
            return []
        probe = self._probe_ids()
        ids = self._base.encode_batch([_PROBE + " " + text])[0]
        return (
            ids[len(probe) :] if ids[: len(probe)] == probe else self._base.encode_batch([text])[0]
        )

    def _probe_ids(self) -> list[int]:
        if self.__dict__.get("_probe") is None:
            self._probe = self._base.encode_batch([_PROBE])[0]
        return self._probe

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._base.encode_batch(texts)

    def encode_arrays(self, texts: Sequence[str]) -> list:
        """``encode_batch`` as one integer numpy array per text: what glm-preprocess writes, at the least cost."""
        return self._base.encode_arrays(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, spelled one way beside special tokens: a space between a special token and a word
        (and between two specials), a word after one as running text spells it; ``encode`` of the result
        gives ``ids`` back."""
        out, run = "", []

        def flush():
            nonlocal out, run
            if run:
                out += self._decode_running(run) if out else self._base.decode(run)
                run = []

        for i in map(int, ids):
            if i in self._spelling:
                flush()
                out = out.rstrip()
                out += (" " if out else "") + self._spelling[i]
            elif 0 <= i < self.base_vocab_size:
                run.append(i)
            else:
                raise ValueError(f"token id {i} is outside this tokenizer's {self.vocab_size} ids")
        flush()
        return out

    def _decode_running(self, run: list[int]) -> str:
        """A run after a special token, with the space its first word starts with (``" b"``), or none (``"b"``)."""
        probe = self._probe_ids()
        head, whole = self._base.decode(probe), self._base.decode(probe + run)
        return whole[len(head) :] if whole.startswith(head) else self._base.decode(run)

    def fingerprint(self) -> str:
        """sha256 over the tokenizer files: datasets record it to catch a tokenizer swap (hashed once)."""
        if self.__dict__.get("_fingerprint"):
            return self._fingerprint
        h = hashlib.sha256(self.spec.type.encode())
        for path in self.spec.files():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        return {
            "type": self.spec.type,
            "files": [os.path.abspath(p) for p in self.spec.files()],
            "fingerprint": self.fingerprint(),
            "vocab_size": self.vocab_size,
            "special_ids": dict(self.special_ids),
        }

    def __repr__(self) -> str:
        return f"GLMTokenizer({self.spec.type}, {self.vocab_size} ids, {len(self._added)} specials appended)"


def load_tokenizer(spec: TokenizerSpec | None = None, **kwargs) -> GLMTokenizer:
    """``load_tokenizer(model="spm.model")`` or ``load_tokenizer(TokenizerSpec(...))``."""
    return GLMTokenizer(spec or TokenizerSpec(**kwargs))
