"""The user's top-level ``kernels/`` and ``data_prep/`` folders never answer to their bare names.

They are ``megatron_glm.kernels`` and ``megatron_glm.data_prep``. setuptools' editable install
needs an ``__init__.py`` in each, and a folder with one is a regular package named ``kernels``
wherever the checkout's root is on ``sys.path``: ``python -c`` or ``-m`` run there, pytest,
a script beside ``setup.py``. ``kernels`` is also Hugging Face's package, which transformers
imports when it loads a model, so the folder would shadow it. Each ``__init__.py`` therefore
checks the name it was imported under, and for a bare name hands the import on to whatever
Python would have found without the checkout's root: the installed package, or nothing.

Standard library only: this runs before anything else of ours is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def hand_on(name: str, init_file: str) -> None:
    """Load the package ``name`` from anywhere but the checkout's root into ``sys.modules[name]``.

    Called from ``{root}/{name}/__init__.py`` while Python imports it as ``name``; the import
    statement then returns the module put in ``sys.modules``, not the folder being executed.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    search = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(name, search) if find_spec else None
        if spec is not None and spec.origin != os.path.abspath(init_file):
            break
    else:
        raise ModuleNotFoundError(
            f"No module named {name!r}: the folder {name}/ in this checkout is megatron_glm.{name}; "
            f"import it under that name",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
