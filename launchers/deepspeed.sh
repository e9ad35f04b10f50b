#!/usr/bin/env bash
# The deepspeed launcher. With HOSTFILE (lines "host slots=8"): multi-node over
# DS_LAUNCHER=pdsh (default; passwordless ssh), openmpi or slurm. Without: this node,
# NUM_GPUS processes. Multi-node, the cluster variables (NCCL_*, TORCH_NCCL_*, GLOO_*,
# OMP_NUM_THREADS, WANDB_*, TORCH_EXTENSIONS_DIR, ...; FORWARD_ENV, a regex of prefixes, replaces the list) reach the
# nodes through $SAVE_DIR/.deepspeed_env (DS_ENV_FILE).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DS_ARGS=(--launcher "${DS_LAUNCHER:-pdsh}" --master_port "${MASTER_PORT:-29500}" --no_local_rank)
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -r "$HOSTFILE" ]] || { echo "launcher: HOSTFILE=$HOSTFILE is not readable" >&2; exit 2; }
    DS_ARGS+=(--hostfile "$HOSTFILE")
    [[ -n "${MASTER_ADDR:-}" ]] && DS_ARGS+=(--master_addr "$MASTER_ADDR")
    # DeepSpeed hands the other nodes only a few variable prefixes, plus its env file's lines: write the
    # cluster settings there (unless DS_ENV_FILE names the user's own file)
    if [[ -z "${DS_ENV_FILE:-}" ]]; then
        mkdir -p "$SAVE_DIR"
        export DS_ENV_FILE="$SAVE_DIR/.deepspeed_env"
        env | grep -E "^(${FORWARD_ENV:-NCCL_|TORCH_NCCL_|GLOO_|OMP_NUM_THREADS=|WANDB_|MEGATRON_GLM_|TRITON_|CUDA_DEVICE_MAX_CONNECTIONS=|PYTORCH_CUDA_ALLOC_CONF=|TOKENIZERS_PARALLELISM=|TORCH_EXTENSIONS_DIR=})" \
            | grep -v -E '^[^=]*=.*[[:cntrl:]]' > "$DS_ENV_FILE" || true
        echo "launcher: $(wc -l < "$DS_ENV_FILE") variables go to every node through $DS_ENV_FILE"
    fi
else
    DS_ARGS+=(--num_nodes 1 --num_gpus "${NUM_GPUS:-1}")
fi
run deepspeed "${DS_ARGS[@]}" ${DEEPSPEED_ARGS:-} --module "$GLM_MODULE" "${GLM_ARGS[@]}"
