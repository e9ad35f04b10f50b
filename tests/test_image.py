"""The lock and the Dockerfile: one list of versions, the one this suite runs with; COPY lines name what exists."""

import fnmatch
import os
import re
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dockerfile() -> str:
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        return f.read()


def lock() -> dict[str, str]:
    """constraints.txt: ``{normalized name: version}``."""
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = [line.strip().split("==") for line in f if line.strip() and not line.startswith("#")]
    assert all(len(pin) == 2 for pin in pins), "constraints.txt holds exact pins only"
    return {canonicalize_name(name): pinned for name, pinned in pins}


def test_the_environment_is_the_lock():
    """make install took constraints.txt: every pin is what runs here (a local build of torch counts as its version)."""
    pins = lock()
    assert {"torch", "deepspeed", "transformers", "kernels", "pip"} <= set(pins)
    wrong = {}
    for name, pinned in pins.items():
        try:
            installed = Version(version(name)).public
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            wrong[name] = (pinned, installed)
    assert wrong == {}, (
        "constraints.txt vs the installed version (make install reinstalls when the lock changes)"
    )


def test_the_image_installs_from_the_lock():
    """One list: the Dockerfile pins nothing itself, and names every runtime dependency of setup.py."""
    text = dockerfile()
    assert "COPY constraints.txt" in text and text.count("-c /tmp/image-constraints.txt") == 2
    assert re.findall(r"[A-Za-z0-9_.-]+==[0-9]", text) == [], (
        "a version pinned in the Dockerfile, not in the lock"
    )
    skipped = (
        re.search(r"grep -vE '\^\(([a-z|]+)\)==' /tmp/constraints.txt", text).group(1).split("|")
    )
    assert skipped == ["torch", "triton", "numpy"]  # what NVIDIA's image brings, built together
    installed = {
        canonicalize_name(word)
        for line in re.findall(r"pip install -c \S+ (.*?)(?:\n\n|&&)", text, re.S)
        for word in line.replace("\\", " ").split()
        if not word.startswith("-")
    }
    runtime = {
        canonicalize_name(Requirement(r).name)
        for r in requires("megatron-glm")
        if "extra ==" not in r
    }
    assert runtime - set(skipped) - installed == set(), (
        "setup.py needs these; the image does not install them"
    )
    assert {"mpi4py", "wandb", "nltk"} <= installed <= set(lock())


def test_every_copied_path_exists_and_is_not_ignored():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ".git" in ignored and ".venv" in ignored
    sources = [
        src
        for line in dockerfile().splitlines()
        if line.startswith("COPY ")
        for src in line.split()[1:-1]
    ]
    assert "megatron_glm" in sources
    for src in sources:
        assert os.path.exists(os.path.join(ROOT, src)), src
        assert not any(fnmatch.fnmatch(src, pattern) for pattern in ignored), src


def test_the_runtime_image_installs_no_test_extra():
    assert "[test]" not in dockerfile() and "-e ." not in dockerfile()
