#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu_check.py): at most 7 minutes on one H100/H200; its results go to $OUT.
#   bash benchmarks/gpu_check.sh            on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    every stage on the CPU with tiny shapes (CI runs this)
# Wheels carried in wheels/ (deepspeed and what it needs there) are installed first; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -d wheels ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps wheels/*.whl
fi
if ! "$PY" -c "import megatron_glm.kernels" 2>/dev/null; then  # the kernels/ folder installs as megatron_glm.kernels
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
exec "$PY" benchmarks/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
