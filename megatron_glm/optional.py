"""Optional accelerators, detected and never required.

NVIDIA apex ships in NGC PyTorch containers but is not on PyPI (the PyPI package named
``apex`` is unrelated), so it counts as present only when its fused modules are there.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def apex_available() -> bool:
    """True when NVIDIA apex with its fused normalization and optimizers is importable."""
    try:
        return all(
            importlib.util.find_spec(m) is not None
            for m in ("apex.normalization", "apex.optimizers")
        )
    except (ImportError, ValueError):  # an unrelated top-level 'apex' without these submodules
        return False
