"""Small helpers shared by the tests."""

import json


def write_jsonl(path, rows):
    """Rows are dicts (serialised) or raw bytes/str lines (written as they are)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, dict):
                row = json.dumps(row)
            if isinstance(row, str):
                row = row.encode("utf-8")
            f.write(row.rstrip(b"\n") + b"\n")
    return str(path)
