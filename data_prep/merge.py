"""glm-merge-datasets: concatenate indexed datasets (same token dtype) into one."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="glm-merge-datasets", description="Concatenate .bin/.idx datasets in order.")
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (without .bin/.idx)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from megatron_glm.data.indexed import IndexedDatasetError, merge_datasets

    try:
        merged = merge_datasets(args.input, args.output_prefix, overwrite=args.overwrite)
    except (IndexedDatasetError, FileNotFoundError, FileExistsError) as e:
        print(f"glm-merge-datasets: error: {e}", file=sys.stderr)
        return 1
    print(f"glm-merge-datasets: wrote {merged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
