"""apex is detected when NVIDIA's fused modules are importable, and only then."""

import sys

from megatron_glm import optional


def make_package(root, name, submodules):
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for sub in submodules:
        (pkg / sub).mkdir()
        (pkg / sub / "__init__.py").write_text("")


def forget_apex():
    for name in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        del sys.modules[name]
    optional.apex_available.cache_clear()


def test_apex_detection(tmp_path, monkeypatch):
    forget_apex()
    monkeypatch.setattr(sys, "path", list(sys.path))
    unrelated, nvidia = tmp_path / "unrelated", tmp_path / "nvidia"
    unrelated.mkdir()
    nvidia.mkdir()
    make_package(unrelated, "apex", [])
    make_package(nvidia, "apex", ["normalization", "optimizers"])
    monkeypatch.syspath_prepend(str(unrelated))
    assert not optional.apex_available(), "the unrelated PyPI 'apex' must not count"
    forget_apex()
    monkeypatch.syspath_prepend(str(nvidia))
    try:
        assert optional.apex_available()
    finally:
        forget_apex()
