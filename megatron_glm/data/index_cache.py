"""Sample-index arrays built once (by global rank 0), cached as .npy, memory-mapped by every rank.

A cache entry is complete when its description file exists: the arrays are written under
temporary names and renamed first, the description last, so a build killed half-way is
simply rebuilt. The key hashes everything the arrays depend on, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Callable

import numpy as np


def distributed():
    """torch.distributed when a process group is up; never imports torch by itself."""
    torch = sys.modules.get("torch")
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        return torch.distributed
    return None


def cache_key(description: dict) -> str:
    return hashlib.sha1(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def load_or_build(
    cache_dir: str, stem: str, description: dict, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Arrays for ``description``: from the cache if complete, else built by rank 0 and saved."""
    base = os.path.join(cache_dir, f"{stem}_{cache_key(description)}")
    marker = base + "_description.json"
    dist = distributed()
    if (dist is None or dist.get_rank() == 0) and not os.path.exists(marker):
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise OSError(
                f"cannot create the index cache {cache_dir} ({e}); pass --data-cache-path to a writable "
                "folder"
            ) from e
        arrays = build()
        for name, array in arrays.items():
            tmp = f"{base}_{name}.tmp-{os.getpid()}.npy"
            np.save(tmp, array, allow_pickle=False)
            os.replace(tmp, f"{base}_{name}.npy")
        with open(marker + f".tmp-{os.getpid()}", "w") as f:
            json.dump({**description, "arrays": sorted(arrays)}, f, indent=1)
        os.replace(marker + f".tmp-{os.getpid()}", marker)
    if dist is not None:
        dist.barrier()
    if not os.path.exists(marker):
        raise FileNotFoundError(
            f"{marker} is missing after rank 0 built it: every rank must see the index cache; "
            "put --data-cache-path on a filesystem all nodes share"
        )
    with open(marker) as f:
        names = json.load(f)["arrays"]
    return {
        name: np.load(f"{base}_{name}.npy", mmap_mode="r", allow_pickle=False) for name in names
    }
