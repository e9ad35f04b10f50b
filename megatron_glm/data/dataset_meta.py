"""``{prefix}.meta.json``: what glm-preprocess records beside a dataset, and the checks it enables.

Megatron's own preprocessor writes no such file, so every check here works without it: token
ids are always checked against the vocabulary, and a missing record only costs the
tokenizer-identity check (with a warning saying so).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from megatron_glm.data.index_cache import distributed, load_or_build
from megatron_glm.data.indexed import IndexedDataset, IndexedDatasetError, check_dtype_holds_vocab

log = logging.getLogger(__name__)


def meta_path(prefix: str) -> str:
    return f"{os.fspath(prefix)}.meta.json"


def read_meta(prefix: str) -> dict | None:
    """The dataset's record, ``None`` when there is none (a Megatron-made dataset)."""
    path = meta_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexedDatasetError(
            f"{path} is corrupt ({e}); delete it to train without the tokenizer check, or "
            "re-run glm-preprocess"
        ) from None
    if not isinstance(meta, dict):
        raise IndexedDatasetError(f"{path} is not a glm-preprocess record (a JSON object)")
    return meta


def check_meta_matches(prefix: str, ds: IndexedDataset, meta: dict) -> None:
    """The record describes this very pair (a changed dtype code or a swapped .bin shows here)."""
    problems = []
    if meta.get("dtype") not in (None, str(ds.dtype)):
        problems.append(f"dtype {meta['dtype']} recorded, {ds.dtype} in the .idx")
    if meta.get("documents") is not None and meta["documents"] != ds.num_documents:
        problems.append(f"{meta['documents']} documents recorded, {ds.num_documents} in the .idx")
    if meta.get("tokens") is not None and meta["tokens"] != ds.num_tokens:
        problems.append(f"{meta['tokens']} tokens recorded, {ds.num_tokens} in the .bin")
    if problems:
        raise IndexedDatasetError(
            f"{prefix}: the .bin/.idx pair is not the one {meta_path(prefix)} describes "
            f"({'; '.join(problems)}): re-run glm-preprocess"
        )


def token_range(ds: IndexedDataset, cache_dir: str | None) -> tuple[int, int]:
    """(min, max) token id; cached beside the sample indices (keyed by the files' identity) when a folder is given."""
    if cache_dir is None:
        return ds.token_range()
    stat = os.stat(ds.prefix + ".bin")
    description = {
        "token_range": ds.fingerprint(),
        "bin_bytes": stat.st_size,
        "bin_mtime_ns": stat.st_mtime_ns,
    }
    arrays = load_or_build(
        cache_dir,
        "token_range",
        description,
        lambda: {"range": np.asarray(ds.token_range(), dtype=np.int64)},
    )
    lo, hi = (int(v) for v in arrays["range"])
    return lo, hi


def check_token_range(prefix: str, id_range: tuple[int, int], vocab_size: int) -> None:
    lo, hi = id_range
    if lo < 0 or hi >= vocab_size:
        raise IndexedDatasetError(
            f"{prefix}.bin: token ids run from {lo} to {hi}, outside the tokenizer's {vocab_size} ids: the data is "
            "corrupt or was made with another tokenizer; re-run glm-preprocess with the tokenizer you train with"
        )


def check_tokenizer_matches(
    prefix: str, ds: IndexedDataset, tokenizer, cache_dir: str | None = None
) -> None:
    """Refuse data this tokenizer cannot have made: ids outside its vocabulary, or another recorded tokenizer."""
    check_dtype_holds_vocab(ds.dtype, tokenizer.vocab_size, where=f"{prefix}.bin")
    meta = read_meta(prefix)
    if meta is not None:
        check_meta_matches(prefix, ds, meta)
        recorded = meta.get("tokenizer") or {}
        if recorded.get("fingerprint") not in (None, tokenizer.fingerprint()):
            raise IndexedDatasetError(
                f"{prefix} was tokenized with {recorded.get('type')} {recorded.get('files')} "
                f"({recorded.get('vocab_size')} ids), not with the tokenizer given here ({tokenizer.spec.type} "
                f"{tokenizer.spec.files()}, {tokenizer.vocab_size} ids): pass the same tokenizer, or re-run "
                "glm-preprocess with this one"
            )
    check_token_range(prefix, token_range(ds, cache_dir), tokenizer.vocab_size)
    dist = distributed()
    if meta is None and (dist is None or dist.get_rank() == 0):
        log.warning(
            "%s has no .meta.json (made by another tool, or the record was deleted): its token ids fit the "
            "tokenizer's %d ids, but which tokenizer made it cannot be checked",
            prefix,
            tokenizer.vocab_size,
        )
