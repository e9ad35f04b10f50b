"""The Dockerfile: its pins are the versions this suite runs with, and its COPY lines name what exists."""

import fnmatch
import os
import re
from importlib.metadata import PackageNotFoundError, version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dockerfile() -> str:
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        return f.read()


def test_the_images_pins_are_the_tested_versions():
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', dockerfile()))
    assert {"deepspeed", "mpi4py", "sentencepiece", "wandb"} <= set(pins)
    wrong = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            wrong[name] = (pinned, installed)
    assert wrong == {}, "Dockerfile pin vs the version the tests ran with"


def test_every_copied_path_exists_and_is_not_ignored():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ".git" in ignored and ".venv" in ignored
    sources = [src for line in dockerfile().splitlines() if line.startswith("COPY ")
               for src in line.split()[1:-1]]
    assert "megatron_glm" in sources
    for src in sources:
        assert os.path.exists(os.path.join(ROOT, src)), src
        assert not any(fnmatch.fnmatch(src, pattern) for pattern in ignored), src


def test_the_runtime_image_installs_no_test_extra():
    assert "[test]" not in dockerfile() and "-e ." not in dockerfile()
