"""glm-train-tokenizer: train a sentencepiece model on JSONL with the GLM special tokens built in.

Normalisation is the identity, so ``decode(encode(text)) == text`` for any text (with byte
fallback for characters outside the learned alphabet). The special tokens become sentencepiece
pad/unk/eos and control symbols, so the model's own vocabulary holds all ten and
``GLMTokenizer`` appends nothing. Control symbols are never produced from raw text: a corpus
that spells "[MASK]" keeps it as text.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from megatron_glm.data_prep.jsonl import CorpusError, expand_inputs, iter_line_batches, parse_line


def iter_training_texts(paths, key: str, max_chars: int):
    """Every usable document, cut to ``max_chars`` (newlines kept: they become pieces too)."""
    for batch in iter_line_batches(paths):
        for line in batch.lines:
            cause, texts = parse_line(line, [key])
            if not cause:
                yield texts[0][:max_chars]


def train_tokenizer(
    inputs,
    model_prefix: str,
    vocab_size: int = 32000,
    key: str = "text",
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    byte_fallback: bool = True,
    threads: int | None = None,
    overwrite: bool = False,
) -> str:
    """Train and write ``{model_prefix}.model/.vocab`` atomically; returns the .model path."""
    import sentencepiece as spm

    from megatron_glm.data.tokenizer import SPECIAL_TOKENS

    final = f"{model_prefix}.model"
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
    paths = expand_inputs(inputs)
    canonical = {role: spellings[0] for role, spellings in SPECIAL_TOKENS.items()}
    control = [canonical[r] for r in SPECIAL_TOKENS if r not in ("pad", "unk", "eos")]
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spm-") as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_training_texts(paths, key, 4096),
            model_prefix=os.path.join(tmp, "m"),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=16384,  # bytes; 4096 characters of UTF-8 fit
            # Exact round trips (whitespace and newlines matter in code and prose alike).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=byte_fallback,
            pad_id=0,
            pad_piece=canonical["pad"],
            unk_id=1,
            unk_piece=canonical["unk"],
            eos_id=2,
            eos_piece=canonical["eos"],
            bos_id=-1,
            control_symbols=control,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
        os.replace(os.path.join(tmp, "m.vocab"), f"{model_prefix}.vocab")
        os.replace(os.path.join(tmp, "m.model"), final)
    return final


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="glm-train-tokenizer",
        description="Train a sentencepiece tokenizer with the GLM special tokens on JSONL.",
    )
    p.add_argument(
        "--input", nargs="+", required=True, help="files, globs or folders of JSONL (.gz/.zst too)"
    )
    p.add_argument("--model-prefix", required=True, help="writes {prefix}.model and {prefix}.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--json-key", default="text")
    p.add_argument("--model-type", choices=["unigram", "bpe", "char", "word"], default="unigram")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument(
        "--input-sentence-size", type=int, default=2_000_000, help="lines sampled for training"
    )
    p.add_argument(
        "--no-byte-fallback", action="store_true", help="unknown characters become [unk], not bytes"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        path = train_tokenizer(
            args.input,
            args.model_prefix,
            args.vocab_size,
            args.json_key,
            args.model_type,
            args.character_coverage,
            args.input_sentence_size,
            not args.no_byte_fallback,
            args.threads,
            args.overwrite,
        )
    except (CorpusError, FileExistsError) as e:
        print(f"glm-train-tokenizer: error: {e}", file=sys.stderr)
        return 1
    except (
        RuntimeError
    ) as e:  # sentencepiece's own complaints, e.g. a vocab larger than the corpus allows
        print(f"glm-train-tokenizer: sentencepiece failed: {e}", file=sys.stderr)
        return 1
    print(f"glm-train-tokenizer: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
