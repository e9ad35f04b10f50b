"""glm-pretrain's flags, named as in Megatron-LM, and their checks (before any work starts)."""

from __future__ import annotations

import argparse

from megatron_glm.config import PRESETS, ModelConfig, preset
from megatron_glm.data.eval_tasks import argparse_spec
from megatron_glm.model.attention import IMPLEMENTATIONS
from megatron_glm.training.engine import OPTIMIZER_IMPLS


def build_parser() -> argparse.ArgumentParser:
    from megatron_glm.data.tokenizer import add_tokenizer_args

    p = argparse.ArgumentParser(allow_abbrev=False, prog="glm-pretrain",
                                description="Pretrain GLM with autoregressive blank infilling.")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), help="sizes of a published GLM (flags below override)")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--position-embedding-type", choices=["learned_2d", "rotary_2d"], default="learned_2d")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--norm-epsilon", "--layernorm-epsilon", type=float, default=1e-5, help="LayerNorm epsilon")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this times the TP size (Megatron's padding)")
    g.add_argument("--geglu", action="store_true", help="GLM-130B's gated MLP")
    g.add_argument("--deepnorm", action="store_true", help="GLM-130B's DeepNorm (post-LN, scaled residual)")
    g.add_argument("--embedding-gradient-shrink-alpha", type=float, default=1.0,
                   help="GLM-130B's stability trick: the word embedding's gradient times alpha (GLM-130B: 0.1), "
                        "the forward unchanged; 1.0 is off")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="accepted for Megatron command lines: the attention softmax is always computed in fp32 here "
                        "(every --attention-impl), its probabilities then cast to the compute dtype")
    g.add_argument("--attention-impl", choices=IMPLEMENTATIONS, default="auto",
                   help="auto: the Triton GLM-mask flash kernel on CUDA, SDPA with a dense mask elsewhere")
    g.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="fused kernels (attention, softmax, 2D embeddings, rotary): Triton on CUDA (auto), "
                        "or force either side")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true", help="LayerNorm and dropout on sequence chunks (TP>1)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: layers per model chunk (each rank holds several chunks)")
    g.add_argument("--pipeline-layers", type=int, nargs="+", default=None,
                   help="explicit layer counts per (virtual) stage, instead of a uniform split")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)

    g = p.add_argument_group("blank infilling (the GLM objective; THUDM/GLM's flags and defaults)")
    g.add_argument("--bert-prob", type=float, default=1.0, help="token objective ([MASK]) probability")
    g.add_argument("--gap-sentence-prob", type=float, default=0.0, help="sentence objective ([sMASK]) probability")
    g.add_argument("--mask-ratio", type=float, default=0.15)
    g.add_argument("--poisson-lambda", type=float, default=3.0)
    g.add_argument("--gap-sentence-ratio", type=float, default=0.15)
    g.add_argument("--gpt-min-ratio", type=float, default=0.5, help="shortest [gMASK] span, fraction of the text")
    g.add_argument("--gpt-infill-prob", type=float, default=0.5,
                   help="document objective: probability of a suffix (no [eop]); otherwise one span anywhere in a "
                        "one-document sample (with [eop]). Samples of several documents always take a suffix")
    g.add_argument("--block-mask-prob", type=float, default=0.0,
                   help="token objective: replace each Part B input token by [dBLOCK] with this probability "
                        "(GLM-10B: 0.1)")
    g.add_argument("--context-mask-ratio", type=float, default=0.0,
                   help="token objective: replace this fraction of the text, among the tokens within "
                        "--context-mask-range of a blank, by [dBLOCK]")
    g.add_argument("--context-mask-range", type=int, default=3)
    g.add_argument("--random-position", action="store_true",
                   help="shift the positions of a sample by a random offset, so that every position row trains")
    g.add_argument("--no-shuffle-blocks", action="store_true", help="keep Part B spans in text order")
    g.add_argument("--single-span-prob", type=float, default=0.0)
    g.add_argument("--short-seq-prob", type=float, default=0.0)
    g.add_argument("--no-task-mask", action="store_true", help="[MASK] for every objective")
    g.add_argument("--packed-segments", action="store_true", help="one segment per document (GLM-130B style)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", required=True, help="prefix, or weight/prefix pairs: 0.7 A 0.3 B")
    g.add_argument("--split", default="949,50,1")
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--data-cache-path", help="sample-index cache (default: index-cache/ beside the data)")
    g.add_argument("--num-workers", type=int, default=2,
                   help="data-loader worker processes per rank that read and collate micro-batches ahead of the "
                        "step; 0 collates in the training process")
    add_tokenizer_args(p)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None, help="steps to train (or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="samples to train, Megatron's sample-based training: the steps follow from the global "
                        "batch (and --rampup-batch-size); the lr lengths are then --lr-*-samples")
    g.add_argument("--rampup-batch-size", type=int, nargs=3, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="start at START samples a step and grow by INCREMENT until --global-batch-size, over SAMPLES "
                        "samples (needs --train-samples)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="cosine")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: the last iterations of the decay, where the rate falls from --lr to --min-lr")
    g.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   default="exponential")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="with --train-samples; default: --train-samples")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="with --train-samples: WSD's decay")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up as a fraction of the decay iterations (--lr-decay-iters), Megatron's meaning")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default="adamw",
                   help="adamw: torch's AdamW (foreach); fused-adamw: its fused kernel; apex: apex's FusedAdam")
    g.add_argument("--layernorm-impl", choices=["torch", "apex"], default="torch",
                   help="apex: apex's FusedLayerNorm (NVIDIA apex, not on PyPI: NGC containers have it)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    g.add_argument("--cpu-offload", action="store_true", help="keep optimizer states in host memory (ZeRO >= 1)")
    g.add_argument("--deepspeed-config", "--deepspeed_config",
                   help="a DeepSpeed JSON; its keys override the flags that set them (ZeRO stage and offload, "
                        "clipping, bf16/fp16, an Adam/AdamW optimizer block); a scheduler block or batch sizes that "
                        "contradict the flags are refused")
    g.add_argument("--deepspeed", action="store_true",
                   help="accepted for Megatron-DeepSpeed and THUDM/GLM command lines: DeepSpeed always runs here")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save", help="checkpoint folder")
    g.add_argument("--load", help="resume from this folder's latest checkpoint (default: --save, when it holds one)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load --load's files with unrestricted unpickling (they can run code): only for files from a "
                        "source you trust that hold objects beyond tensors, numbers and DeepSpeed's optimizer states")
    g.add_argument("--no-load-optim", action="store_true",
                   help="from --load take the weights, iteration and data position, not the optimizer or lr "
                        "schedule (Adam moments and the warm-up start again, as in Megatron)")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore --load's random states (--seed's)")
    g.add_argument("--finetune", action="store_true",
                   help="from --load take only the weights: iteration, data position, optimizer, lr schedule and "
                        "RNG start fresh. A restarted job that finds its own checkpoint in --save resumes that")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on resume, switch to the lr schedule the flags give, from the checkpoint's step on "
                        "(Megatron's flag); without it a schedule that differs from the checkpoint's is refused")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on resume, continue the checkpoint's lr schedule whatever the lr flags say (Megatron's flag)")
    # the launchers' habit; LOCAL_RANK rules
    g.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    g.add_argument("--stop-file", help="stop after the current step, save and exit 75 (requeue) once this file "
                                       "exists; SIGTERM and SIGUSR1 do the same")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--async-save", action="store_true",
                   help="copy each checkpoint to host memory and write it in the background while training goes on "
                        "(one save in flight; the next save and the end of the run wait for it)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit (status 0) after the first iteration divisible by this (Megatron's flag)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit (status 0) after the first iteration that ends past this many minutes of "
                        "training; the same command continues")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="accepted for Megatron command lines: SIGTERM and SIGUSR1 always save and exit here")
    g.add_argument("--keep-last", type=int, default=0,
                   help="keep the newest N checkpoints, delete older ones; 0 (the default, as in Megatron) keeps all")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-tasks", nargs="+", type=argparse_spec, default=[], metavar="KIND:FILE",
                   help="zero-shot tasks run every --eval-interval on the training model and logged like the "
                        "losses: blank:FILE (held-out documents), choice:FILE (multiple choice), lambada:FILE; "
                        "JSONL, as glm-eval reads them")
    g.add_argument("--eval-iters", type=int, default=10,
                   help="global batches per validation (Megatron's count), split over the data-parallel ranks")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--log-dir", help="metrics.jsonl and TensorBoard events (default: --save)")
    g.add_argument("--log-all-ranks", action="store_true",
                   help="every rank's log records on the console (default: rank 0's, and warnings from all)")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard events (needs tensorboard)")
    g.add_argument("--tensorboard-dir", help="where TensorBoard events go (implies --tensorboard; default: "
                                             "{log dir}/tensorboard)")
    g.add_argument("--measure-memory", action="store_true",
                   help="write memory_rank{R}.json to the log folder: bytes live after set-up and the peak over "
                        "the steps (CUDA allocator counters; on CPU, allocations recorded by the profiler, which keeps "
                        "every event: for runs of a few steps)")
    g.add_argument("--wandb-project", help="log to Weights & Biases (offline unless WANDB_MODE/API key say otherwise)")
    return p


def model_config_from_args(args, vocab_size: int, validate: bool = True) -> ModelConfig:
    """The model the flags describe; ``vocab_size`` comes from the tokenizer (0 until it is known)."""
    base = preset(args.preset) if args.preset else ModelConfig()
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings"):
        value = getattr(args, name)
        if value is not None:
            setattr(base, name, value)
    if args.hidden_size is not None and args.ffn_hidden_size is None:
        base.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None and not args.preset:
        base.max_position_embeddings = args.seq_length
    base.vocab_size = vocab_size
    base.position_embedding_type = args.position_embedding_type
    base.hidden_dropout, base.attention_dropout = args.hidden_dropout, args.attention_dropout
    base.init_method_std, base.geglu, base.deepnorm = args.init_method_std, args.geglu, args.deepnorm
    base.embedding_gradient_shrink_alpha = args.embedding_gradient_shrink_alpha
    base.layernorm_epsilon = args.norm_epsilon
    if validate:
        base.validate(seq_length=args.seq_length)
    return base


def _given(*pairs) -> list[str]:
    """The flags of ``(flag, value)`` pairs that were set."""
    return [flag for flag, value in pairs if value]


def _training_length_problems(args) -> list[str]:
    """Megatron's two ways to say how long to train, and the lr lengths that go with each."""
    if (args.train_iters is None) == (args.train_samples is None):
        return ["pass one of --train-iters (steps) and --train-samples (samples)"]
    if args.train_iters is not None:
        wrong = _given(("--lr-decay-samples", args.lr_decay_samples), ("--lr-warmup-samples", args.lr_warmup_samples),
                       ("--lr-wsd-decay-samples", args.lr_wsd_decay_samples),
                       ("--rampup-batch-size", args.rampup_batch_size))
        found = ["--train-iters must be positive"] if args.train_iters < 1 else []
        if wrong:
            found.append(f"{', '.join(wrong)} go with --train-samples; with --train-iters use the --lr-*-iters "
                         "flags (a batch-size ramp-up needs sample-based training, as in Megatron)")
        return found
    wrong = _given(("--lr-decay-iters", args.lr_decay_iters), ("--lr-warmup-iters", args.lr_warmup_iters),
                   ("--lr-wsd-decay-iters", args.lr_wsd_decay_iters))
    found = ["--train-samples must be positive"] if args.train_samples < 1 else []
    if wrong:
        found.append(f"{', '.join(wrong)} go with --train-iters; with --train-samples use --lr-decay-samples, "
                     "--lr-warmup-samples and --lr-wsd-decay-samples")
    return found


def validate_args(args, world_size: int = 1) -> None:
    """Everything that can be checked before a process group, a tokenizer or data is touched."""
    from megatron_glm.parallel.state import ParallelLayoutError, check_layout

    problems = []
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    try:  # the sizes that need the model (heads, hidden, vocabulary) are checked once the tokenizer is known
        check_layout(world_size, tp, pp)
    except ParallelLayoutError as e:
        problems.append(str(e))
        tp = pp = 1
    if args.cpu_offload and args.zero_stage < 1:
        problems.append("--cpu-offload needs --zero-stage 1, 2 or 3 (the optimizer states must be partitioned)")
    if pp > 1 and args.zero_stage >= 2:
        problems.append(f"--zero-stage {args.zero_stage} cannot be combined with pipeline parallelism (DeepSpeed "
                        "partitions gradients that the pipeline schedule accumulates); use --zero-stage 0 or 1")
    vpp_layers = args.num_layers_per_virtual_pipeline_stage
    if vpp_layers is not None and vpp_layers < 1:
        problems.append("--num-layers-per-virtual-pipeline-stage must be positive")
    elif vpp_layers is not None and pp == 1:
        problems.append("--num-layers-per-virtual-pipeline-stage interleaves pipeline stages: it needs "
                        "--pipeline-model-parallel-size > 1")
    if args.sequence_parallel and tp == 1:
        problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.sequence_parallel and args.seq_length % tp:
        problems.append(f"--sequence-parallel needs --seq-length {args.seq_length} divisible by the TP size {tp}")
    if args.num_workers < 0:
        problems.append(f"--num-workers {args.num_workers}: use 0 (collate in the training process) or more")
    if args.recompute_num_layers < 1:
        problems.append("--recompute-num-layers must be at least 1")
    data_parallel_size = max(world_size // (tp * pp), 1)
    if args.bf16 and args.fp16:
        problems.append("--bf16 and --fp16 exclude each other")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * data_parallel_size
    step = args.micro_batch_size * data_parallel_size
    if args.micro_batch_size < 1 or args.global_batch_size % step:
        problems.append(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
                        f"{args.micro_batch_size} x data-parallel size {data_parallel_size}")
    elif args.rampup_batch_size:
        from megatron_glm.training.batch_schedule import BatchSchedule

        problems += BatchSchedule(args.global_batch_size, step, tuple(args.rampup_batch_size)).problems()
    problems += _training_length_problems(args)
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        problems.append("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other: "
                        "pass the one whose schedule the run should follow")
    if (args.finetune or args.no_load_optim or args.no_load_rng) and not args.load:
        problems.append("--finetune, --no-load-optim and --no-load-rng say what to take from --load: pass --load")
    if args.save_interval is not None and args.save_interval < 1:
        problems.append("--save-interval must be positive")
    if args.measure_memory and not (args.log_dir or args.save):
        problems.append("--measure-memory needs --log-dir or --save (where memory_rank{R}.json goes)")
    if args.make_vocab_size_divisible_by < 1:
        problems.append("--make-vocab-size-divisible-by must be positive")
    if args.exit_interval is not None and args.exit_interval < 1:
        problems.append("--exit-interval must be positive")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        problems.append("--exit-duration-in-mins must be positive")
    if args.save_interval and not args.save:
        problems.append("--save-interval needs --save")
    if args.async_save and not args.save:
        problems.append("--async-save needs --save")
    if args.eval_interval < 1 or args.log_interval < 1:
        problems.append("--eval-interval and --log-interval must be positive")
    if not args.clip_grad >= 0:
        problems.append(f"--clip-grad {args.clip_grad}: give a gradient norm >= 0 (0 turns clipping off)")
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction <= 1:
        problems.append("--lr-warmup-fraction must be in [0, 1]")
    if args.lr_warmup_fraction is not None and (args.lr_warmup_iters or args.lr_warmup_samples):
        problems.append("--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples both set the warm-up: "
                        "pass one")
    if vpp_layers and pp > 1 and not problems:
        micro = args.global_batch_size // (args.micro_batch_size * data_parallel_size)
        if micro % pp:
            problems.append(f"the interleaved schedule needs micro-batches per step ({micro}) divisible by "
                            f"--pipeline-model-parallel-size {pp}")
    if problems:
        raise ValueError("; ".join(problems))
