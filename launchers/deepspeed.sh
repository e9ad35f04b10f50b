#!/usr/bin/env bash
# The deepspeed launcher. With HOSTFILE (lines "host slots=8"): multi-node over
# DS_LAUNCHER=pdsh (default; passwordless ssh), openmpi or slurm. Without: this node,
# NUM_GPUS processes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DS_ARGS=(--launcher "${DS_LAUNCHER:-pdsh}" --master_port "${MASTER_PORT:-29500}" --no_local_rank)
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -r "$HOSTFILE" ]] || { echo "launcher: HOSTFILE=$HOSTFILE is not readable" >&2; exit 2; }
    DS_ARGS+=(--hostfile "$HOSTFILE")
    [[ -n "${MASTER_ADDR:-}" ]] && DS_ARGS+=(--master_addr "$MASTER_ADDR")
else
    DS_ARGS+=(--num_nodes 1 --num_gpus "${NUM_GPUS:-1}")
fi
run deepspeed "${DS_ARGS[@]}" ${DEEPSPEED_ARGS:-} --module megatron_glm.training.pretrain "${GLM_ARGS[@]}"
