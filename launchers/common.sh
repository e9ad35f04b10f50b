# Shared by every launcher: settings from variables or a config file -> glm-pretrain's (or glm-finetune's) flags.
#
# Set variables in the environment, or in a file named by GLM_CONFIG (shell syntax,
# e.g. launchers/example.env); the environment wins over the file. Every launcher prints
# the exact command before running it.

if [[ -n "${GLM_CONFIG:-}" ]]; then
    [[ -r "$GLM_CONFIG" ]] || { echo "launcher: GLM_CONFIG=$GLM_CONFIG is not a readable file" >&2; exit 2; }
    _saved_env=$(export -p)  # the environment wins: re-apply it after the file
    set -a; source "$GLM_CONFIG"; set +a
    eval "$_saved_env"
fi

GLM_COMMAND=${GLM_COMMAND:-pretrain}   # pretrain | finetune
case "$GLM_COMMAND" in
    pretrain)
        : "${DATA_PATH:?set DATA_PATH (the --data-path prefix(es), e.g. 'data/corpus_text_document')}"
        GLM_MODULE=megatron_glm.training.pretrain
        TRAIN_ITERS=${TRAIN_ITERS:-200000}
        # a requeued job resumes from SAVE_DIR
        TASK_ARGS=(--data-path $DATA_PATH --load "${SAVE_DIR:-}") ;;
    finetune)
        : "${FINETUNE_ARGS:?set FINETUNE_ARGS (the task, its splits and where it starts, e.g. '--task classification --train-data train.jsonl --valid-data dev.jsonl --load ckpt/pretrained --finetune --epochs 3')}"
        GLM_MODULE=megatron_glm.training.finetune
        # a requeued job finds its own checkpoint in SAVE_DIR and resumes it, whatever --load says
        TASK_ARGS=($FINETUNE_ARGS) ;;
    *) echo "launcher: GLM_COMMAND=$GLM_COMMAND; use pretrain or finetune" >&2; exit 2 ;;
esac
: "${SAVE_DIR:?set SAVE_DIR (checkpoints; a requeued job resumes from it)}"
PRESET=${PRESET:-glm-large}
SEQ_LENGTH=${SEQ_LENGTH:-512}
MICRO_BATCH=${MICRO_BATCH:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
LR=${LR:-2e-4}
TP=${TP:-1}
PP=${PP:-1}
ZERO_STAGE=${ZERO_STAGE:-1}
PRECISION=${PRECISION:-bf16}          # bf16 | fp16 | fp32
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
LOG_INTERVAL=${LOG_INTERVAL:-10}
STOP_FILE=${STOP_FILE:-$SAVE_DIR/STOP}  # created on a Slurm warning signal: save and exit 75
TOKENIZER_ARGS=${TOKENIZER_ARGS:-}      # e.g. "--tokenizer-model spm.model" or "--vocab-file vocab.json --merge-file merges.txt"
EXTRA_ARGS=${EXTRA_ARGS:-}              # anything else glm-pretrain (glm-finetune) takes
PYTHON=${PYTHON:-python}

GLM_ARGS=(--preset "$PRESET" "${TASK_ARGS[@]}" $TOKENIZER_ARGS
          --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
          ${TRAIN_ITERS:+--train-iters "$TRAIN_ITERS"} --lr "$LR"
          --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --zero-stage "$ZERO_STAGE"
          --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL" --log-interval "$LOG_INTERVAL"
          --stop-file "$STOP_FILE" $EXTRA_ARGS)
case "$PRECISION" in
    bf16) GLM_ARGS+=(--bf16) ;;
    fp16) GLM_ARGS+=(--fp16) ;;
    fp32) ;;
    *) echo "launcher: PRECISION=$PRECISION; use bf16, fp16 or fp32" >&2; exit 2 ;;
esac

EXIT_REQUEUE=75  # glm-pretrain's (and glm-finetune's) status after saving on SIGTERM/SIGUSR1/the stop file

run() {  # print, then run
    printf '+'; printf ' %q' "$@"; printf '\n'
    "$@"
}
