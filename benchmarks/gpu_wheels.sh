#!/usr/bin/env bash
# Fill wheels/ with what the GPU machine lacks for benchmarks/gpu_check.sh (it has torch, triton, pytest,
# tokenizers, safetensors, ... and Python 3.12, no internet): deepspeed and the packages it needs that are
# not there, at the versions this checkout's .venv runs. Then carry wheels/ with the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf wheels && mkdir wheels
"$PY" -m pip wheel -q --no-deps -w wheels "deepspeed==$(version deepspeed)"
"$PY" -m pip download -q --no-deps -d wheels "hjson==$(version hjson)" "pydantic==$(version pydantic)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
# compiled ones, for the GPU machine's CPython 3.12 on x86-64
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \
    "pydantic-core==$(version pydantic-core)" "orjson==$(version orjson)" "zstandard==$(version zstandard)"
ls -l wheels
