"""A corpus every machine has: the docstrings of Python's standard library, as JSONL.

Sources are parsed with ``ast``, never imported (importing ``antigravity`` opens a browser),
and walked in sorted order, so the corpus depends only on the Python version. The demo,
tests and benchmarks build their data from it at run time.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
import warnings


def iter_docstrings(min_chars: int = 40):
    """``(module path, docstring)`` for every module, class and function docstring."""
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                ):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        yield os.path.relpath(path, root), doc


def write_corpus(path: str, max_docs: int | None = None) -> int:
    """Write ``{"text": ...}`` lines; returns the number of documents."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for source, doc in iter_docstrings():
            f.write(json.dumps({"text": doc, "source": source}) + "\n")
            n += 1
            if max_docs and n >= max_docs:
                break
    os.replace(path + ".tmp", path)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False, description="Write the standard library's docstrings as a JSONL corpus."
    )
    p.add_argument("output")
    p.add_argument("--max-docs", type=int)
    args = p.parse_args(argv)
    n = write_corpus(args.output, args.max_docs)
    print(f"wrote {n} documents to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
