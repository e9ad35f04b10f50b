"""The tokenizer a megatron-glm model was trained with, for transformers.

A base vocabulary (a sentencepiece model, a ``tokenizers`` JSON file, a BERT ``vocab.txt`` or
GPT-2's ``vocab.json`` + ``merges.txt``) plus GLM's special tokens at the ids training used:
``glm_special_tokens`` in ``tokenizer_config.json`` gives each role its id and the spellings
recognised in text. Text that contains a spelling (``[MASK]``, ``[sop]``, ...) gets the
special id unless ``split_special_tokens=True``; everything else is the base tokenizer's,
unchanged. Decoding spells each special token one way (the first spelling).
"""

import os
import re
import shutil

from transformers import PreTrainedTokenizer

# the file each backend reads, under the names the export gives them
FILES = {
    "sentencepiece": ("tokenizer.model",),
    "hf": ("glm_tokenizer.json",),
    "bert": ("vocab.txt",),
    "bert-cased": ("vocab.txt",),
    "gpt2": ("vocab.json", "merges.txt"),
}


_PROBE = "a"  # a word every base vocabulary spells as its own token(s)


class _SentencePiece:
    def __init__(self, files):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=files[0])
        self.size = self.sp.get_piece_size()

    def tokenize(self, text):
        return self.sp.encode(text, out_type=str)

    def token_to_id(self, token):
        return self.sp.piece_to_id(token)

    def id_to_token(self, index):
        return self.sp.id_to_piece(index)

    def vocab(self):
        return {self.sp.id_to_piece(i): i for i in range(self.size)}

    def decode(self, ids):
        return self.sp.decode(ids)


class _Tokenizers:
    def __init__(self, kind, files):
        import tokenizers

        if kind == "hf":
            tok = tokenizers.Tokenizer.from_file(files[0])
        elif kind in ("bert", "bert-cased"):
            tok = tokenizers.BertWordPieceTokenizer(files[0], lowercase=kind == "bert")._tokenizer
        else:
            tok = tokenizers.ByteLevelBPETokenizer(files[0], files[1])._tokenizer
        tok.encode_special_tokens = True  # the specials are ours to recognise, by our spellings
        self.tok = tok
        self.size = tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text):
        return self.tok.encode(text, add_special_tokens=False).tokens

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def id_to_token(self, index):
        return self.tok.id_to_token(index)

    def vocab(self):
        return self.tok.get_vocab(with_added_tokens=True)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)


class MegatronGLMTokenizer(PreTrainedTokenizer):
    """GLM's tokenizer: ``tokenizer.sop_token_id``, ``eop_token_id``, ``gmask_token_id``... beside the usual ones."""

    vocab_files_names = {
        "sp_model_file": "tokenizer.model",
        "json_file": "glm_tokenizer.json",
        "wordpiece_file": "vocab.txt",
        "gpt2_vocab_file": "vocab.json",
        "merges_file": "merges.txt",
    }
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        sp_model_file=None,
        json_file=None,
        wordpiece_file=None,
        gpt2_vocab_file=None,
        merges_file=None,
        glm_backend="sentencepiece",
        glm_special_tokens=None,
        **kwargs,
    ):
        given = {
            "sentencepiece": [sp_model_file],
            "hf": [json_file],
            "bert": [wordpiece_file],
            "bert-cased": [wordpiece_file],
            "gpt2": [gpt2_vocab_file, merges_file],
        }
        if glm_backend not in given or not glm_special_tokens:
            raise ValueError(
                f"tokenizer_config.json: unknown glm_backend {glm_backend!r} or no glm_special_tokens"
            )
        files = given[glm_backend]
        if not all(files):
            raise ValueError(
                f"a {glm_backend} GLM tokenizer needs {' and '.join(FILES[glm_backend])} beside "
                "tokenizer_config.json"
            )
        self.glm_backend, self.glm_files, self.glm_special_tokens = (
            glm_backend,
            files,
            glm_special_tokens,
        )
        self._base = (
            _SentencePiece(files)
            if glm_backend == "sentencepiece"
            else _Tokenizers(glm_backend, files)
        )
        # the probe word's tokens and ids: text after a special token is tokenized and decoded behind it
        self._probe = self._base.tokenize(_PROBE)
        self._probe_ids = [self._base.token_to_id(t) for t in self._probe]
        self._role_ids = {role: int(s["id"]) for role, s in glm_special_tokens.items()}
        self._spelling = {int(s["id"]): s["spellings"][0] for s in glm_special_tokens.values()}
        self._id_of = {
            sp: int(s["id"]) for s in glm_special_tokens.values() for sp in s["spellings"]
        }
        spellings = sorted(self._id_of, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, spellings)) + ")")
        self._appended = {i: sp for i, sp in self._spelling.items() if i >= self._base.size}
        self._appended_ids = {sp: i for i, sp in self._appended.items()}
        # a special id's string in the vocabulary: the base's own token if it had one, else the first spelling
        self._token_of = {
            i: self._appended.get(i) or self._base.id_to_token(i) for i in self._spelling
        }
        for role in ("pad", "cls", "mask", "eos", "unk", "sep"):
            if role in self._role_ids:
                kwargs.setdefault(f"{role}_token", self._token_of[self._role_ids[role]])
        kwargs.setdefault(
            "extra_special_tokens",
            [
                self._token_of[self._role_ids[r]]
                for r in ("smask", "gmask", "sop", "eop", "dblock")
                if r in self._role_ids
            ],
        )
        # passed on, so that save_pretrained writes them to tokenizer_config.json again
        super().__init__(glm_backend=glm_backend, glm_special_tokens=glm_special_tokens, **kwargs)

    # GLM's own roles beside transformers' mask/pad/eos/unk/cls/sep
    sop_token_id = property(lambda self: self._role_ids.get("sop"))
    eop_token_id = property(lambda self: self._role_ids.get("eop"))
    smask_token_id = property(lambda self: self._role_ids.get("smask"))
    gmask_token_id = property(lambda self: self._role_ids.get("gmask"))

    @property
    def vocab_size(self):
        return self._base.size + len(self._appended)

    def get_vocab(self):
        vocab = self._base.vocab()
        vocab.update({sp: i for i, sp in self._appended.items()})
        return vocab

    def tokenize(self, text, **kwargs):
        """Base tokens, with the special spellings (unless ``split_special_tokens``) as tokens of their own, by
        THUDM's rule beside them (as glm-pretrain's tokenizer): whitespace before a special token is
        dropped, and text after one that starts with whitespace is a word of running text."""
        if kwargs.pop("split_special_tokens", self.split_special_tokens):
            return self._base.tokenize(text)
        tokens = []
        parts = self._special_re.split(text)
        for k, part in enumerate(parts):
            if k % 2:
                tokens.append(self._token_of[self._id_of[part]])
                continue
            if k < len(parts) - 1:
                part = part.rstrip()
            if k > 0 and part[:1].isspace():
                tokens.extend(self._running(part.lstrip()))
            elif part:
                tokens.extend(self._base.tokenize(part))
        return tokens

    def _running(self, text):
        """``text`` as a word of running text tokenizes (behind a probe word whose tokens are dropped)."""
        if not text:
            return []
        probe = self._probe
        tokens = self._base.tokenize(_PROBE + " " + text)
        return tokens[len(probe) :] if tokens[: len(probe)] == probe else self._base.tokenize(text)

    def _tokenize(self, text, **kwargs):
        return self._base.tokenize(text)

    def _convert_token_to_id(self, token):
        found = self._appended_ids.get(token)
        if found is None:
            found = self._base.token_to_id(token)
        return self._role_ids.get("unk", 0) if found is None else found

    def _convert_id_to_token(self, index):
        return self._appended.get(index) or self._base.id_to_token(index)

    def convert_tokens_to_string(self, tokens):
        return self._decode([self._convert_token_to_id(t) for t in tokens])

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        """The base decoder over each run of ordinary ids; a special id spelled one way (or skipped), with a space
        between it and a word, and a word after it as running text spells it."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        probe = self._probe_ids
        out, run = "", []

        def flush():
            nonlocal out, run
            if run:
                if out:  # after a special token: the space its first word starts with, or none
                    head, whole = self._base.decode(probe), self._base.decode(probe + run)
                    out += whole[len(head) :] if whole.startswith(head) else self._base.decode(run)
                else:
                    out = self._base.decode(run)
                run = []

        for i in map(int, ids):
            if i in self._spelling:
                flush()
                if not skip_special_tokens:
                    out = out.rstrip()
                    out += (" " if out else "") + self._spelling[i]
            elif 0 <= i < self._base.size:
                run.append(i)
            else:
                raise ValueError(
                    f"token id {i} is outside this tokenizer's {self.vocab_size} ids (a padding row "
                    "of the embedding table)"
                )
        flush()
        return out

    def save_vocabulary(self, save_directory, filename_prefix=None):
        written = []
        for source, name in zip(self.glm_files, FILES[self.glm_backend]):
            target = os.path.join(
                save_directory, (filename_prefix + "-" if filename_prefix else "") + name
            )
            if os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
            written.append(target)
        return tuple(written)


__all__ = ["MegatronGLMTokenizer"]
