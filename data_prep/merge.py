"""glm-merge-datasets: concatenate indexed datasets (same token dtype and tokenizer) into one.

Inputs are checked before anything is written: each index whole, the token dtype, and the
tokenizer each one's .meta.json records. The output gets a .meta.json when the inputs agree
on their tokenizer, so training can still check it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class MergeError(ValueError):
    """Inputs that must not be merged as they are; nothing was written."""


def merged_meta(prefixes: list[str], force: bool) -> dict | None:
    """The record of the merge, or ``None`` where the inputs' tokenizer is unknown (or forced past a conflict)."""
    from megatron_glm.data.dataset_meta import check_meta_matches, check_token_range, read_meta
    from megatron_glm.data.indexed import IndexedDataset

    metas = [read_meta(p) for p in prefixes]
    datasets = [IndexedDataset(p) for p in prefixes]
    for prefix, ds, meta in zip(prefixes, datasets, metas):
        if meta is not None:
            check_meta_matches(prefix, ds, meta)
    known = [(p, m["tokenizer"]) for p, m in zip(prefixes, metas) if m and m.get("tokenizer")]
    if len({t.get("fingerprint") for _, t in known}) > 1:
        listing = "; ".join(f"{p}: {t.get('type')} {t.get('files')}" for p, t in known)
        if not force:
            raise MergeError(
                f"the inputs were tokenized with different tokenizers ({listing}); their ids mean "
                "different things. Re-run glm-preprocess with one tokenizer, or pass --force to merge "
                "anyway (the output then gets no .meta.json)"
            )
        print(
            f"glm-merge-datasets: warning: merging different tokenizers (--force): {listing}",
            file=sys.stderr,
        )
        return None
    if len(known) < len(prefixes):
        missing = [p for p, m in zip(prefixes, metas) if not (m and m.get("tokenizer"))]
        print(
            f"glm-merge-datasets: warning: {', '.join(missing)} record no tokenizer (no .meta.json): the output "
            "gets none, so training cannot check which tokenizer made it",
            file=sys.stderr,
        )
        return None
    tokenizer = known[0][1]
    for prefix, ds in zip(prefixes, datasets):
        check_token_range(prefix, ds.token_range(), tokenizer["vocab_size"])
    first = metas[0]
    return {
        "inputs": [os.path.abspath(p) for p in prefixes],
        "merged": True,
        "json_key": first.get("json_key"),
        "append_eod": first.get("append_eod"),
        "documents": sum(ds.num_documents for ds in datasets),
        "tokens": sum(ds.num_tokens for ds in datasets),
        "dtype": str(datasets[0].dtype),
        "tokenizer": tokenizer,
        "megatron_glm_version": __import__("megatron_glm").__version__,
    }


def merge(prefixes: list[str], output_prefix: str, overwrite: bool = False, force: bool = False):
    from megatron_glm.data.dataset_meta import meta_path
    from megatron_glm.data.indexed import merge_datasets

    meta = merged_meta(prefixes, force)
    tmp = f"{meta_path(output_prefix)}.tmp-{os.getpid()}"
    # checks its output before the rename
    merged = merge_datasets(prefixes, output_prefix, overwrite=overwrite)
    if meta is not None:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, meta_path(output_prefix))
    # an older dataset's record must not describe this one
    elif os.path.exists(meta_path(output_prefix)):
        os.remove(meta_path(output_prefix))
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="glm-merge-datasets",
        description="Concatenate .bin/.idx datasets in order.",
        allow_abbrev=False,
    )
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (without .bin/.idx)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--force", action="store_true", help="merge inputs of different tokenizers (no .meta.json)"
    )
    args = p.parse_args(argv)
    from megatron_glm.data.indexed import IndexedDatasetError

    try:
        merged = merge(args.input, args.output_prefix, overwrite=args.overwrite, force=args.force)
    except (MergeError, IndexedDatasetError, FileNotFoundError, FileExistsError) as e:
        print(f"glm-merge-datasets: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(
            f"glm-merge-datasets: error: writing failed ({e}); temporary files removed, nothing written",
            file=sys.stderr,
        )
        return 1
    print(f"glm-merge-datasets: wrote {merged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
