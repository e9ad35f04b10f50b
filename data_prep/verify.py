"""glm-preprocess --verify: check datasets end to end before a run depends on them.

Opening a dataset already checks its whole index; this also reads every token of the .bin
(at memory-map speed) against the vocabulary and compares the pair with its .meta.json.
"""

from __future__ import annotations

import sys


def verify_dataset(prefix: str, tokenizer=None) -> str:
    """A one-line report of a sound dataset; raises ``IndexedDatasetError`` naming what is wrong."""
    from megatron_glm.data.dataset_meta import (
        check_meta_matches,
        check_token_range,
        check_tokenizer_matches,
        read_meta,
    )
    from megatron_glm.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)  # the whole index is checked on opening
    meta = read_meta(prefix)
    if tokenizer is not None:
        check_tokenizer_matches(prefix, ds, tokenizer)  # the record, its tokenizer, and the ids
        vocab = tokenizer.vocab_size
    else:
        vocab = ((meta or {}).get("tokenizer") or {}).get("vocab_size")
        if meta is not None:
            check_meta_matches(prefix, ds, meta)
        if vocab is not None:
            check_token_range(prefix, ds.token_range(), vocab)
    lo, hi = ds.token_range()  # kept by the dataset: the pass over the .bin ran once
    ids = f"ids {lo}..{hi}" if ds.num_tokens else "no tokens"
    checked = (
        f"within the {vocab}-id vocabulary"
        if vocab is not None
        else "not checked against a vocabulary (no .meta.json: pass the tokenizer flags)"
    )
    return f"{prefix}: ok: {ds.num_documents:,} documents, {ds.num_tokens:,} {ds.dtype} tokens, {ids} {checked}"


def main(args) -> int:
    from megatron_glm.data.indexed import IndexedDatasetError
    from megatron_glm.data.tokenizer import GLMTokenizer, TokenizerError, spec_from_args

    failed = 0
    try:
        tokenizer = (
            GLMTokenizer(spec_from_args(args))
            if (args.tokenizer_model or args.vocab_file)
            else None
        )
    except TokenizerError as e:
        print(f"glm-preprocess: error: {e}", file=sys.stderr)
        return 1
    for prefix in args.verify:
        try:
            print(f"glm-preprocess: {verify_dataset(prefix, tokenizer)}")
        except (IndexedDatasetError, FileNotFoundError) as e:
            print(f"glm-preprocess: error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0
