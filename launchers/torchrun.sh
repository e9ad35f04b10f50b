#!/usr/bin/env bash
# One node, torchrun: GPUS_PER_NODE processes (default: every visible GPU, or 1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
GPUS_PER_NODE=${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)}
[[ "${GPUS_PER_NODE:-0}" -gt 0 ]] || GPUS_PER_NODE=1
# torchrun itself, except that a worker's deliberate exit (a requeue, a one-line error) reads as one
run "$PYTHON" -m megatron_glm.training.torchrun --standalone --nproc_per_node "$GPUS_PER_NODE" ${TORCHRUN_ARGS:-} \
    -m "$GLM_MODULE" "${GLM_ARGS[@]}"
