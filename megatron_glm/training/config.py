"""The pretraining job as config dataclasses: what the Trainer is built from.

``glm-pretrain`` turns its flags into a ``JobConfig`` in one place (``from_args``), and checks
there everything that can be checked before a process group, data or a model exists; the
argparse namespace goes no further. The model's configuration needs the tokenizer (the padded
vocabulary), so ``JobConfig.model_config`` completes it once the tokenizer is loaded, and the
layout check that needs the model's sizes runs then, once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable

from megatron_glm.config import ModelConfig
from megatron_glm.data.blank_infilling import BlankInfillingConfig
from megatron_glm.data.tokenizer import TokenizerSpec
from megatron_glm.optional import apex_available
from megatron_glm.training.batch_schedule import BatchSchedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    layers_per_virtual_stage: int | None = None  # interleaved 1F1B
    pipeline_layers: tuple[int, ...] | None = None  # explicit layer counts per (virtual) stage
    sequence_parallel: bool = False
    zero_stage: int = 0
    cpu_offload: bool = False
    recompute: tuple = (None, "uniform", 1)  # granularity, method, layers (Megatron's flags)

    def virtual_stages(self, num_layers: int) -> int:
        per_chunk = self.layers_per_virtual_stage
        return num_layers // (self.pipeline * per_chunk) if per_chunk else 1


@dataclass(frozen=True)
class DataConfig:
    data_path: tuple[str, ...]
    split: str = "949,50,1"
    seq_length: int = 512
    cache_path: str | None = None
    num_workers: int = 2
    micro_batch_size: int = 4
    global_batch_size: int = 4
    tokenizer: TokenizerSpec | None = None  # as given; resolved (and checked) when the Trainer loads it
    objective: BlankInfillingConfig | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    decay_style: str = "cosine"
    warmup_iters: int = 0
    decay_iters: int = 1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    wsd_decay_iters: int | None = None
    wsd_style: str = "exponential"
    # sample-based training (--train-samples): step -> samples before it; the lengths above then count samples
    consumed_before: Callable[[int], int] | None = None
    impl: str = "adamw"  # --optimizer-impl: adamw (torch, foreach) | fused-adamw | apex

    def schedule_record(self) -> dict:
        """What a checkpoint records of the schedule, to hold a resume to it (Megatron's checked values)."""
        return {"lr": self.lr, "min_lr": self.min_lr, "decay_style": self.decay_style, "warmup": self.warmup_iters,
                "decay": self.decay_iters, "wsd_decay": self.wsd_decay_iters, "wsd_style": self.wsd_style,
                "counts": "iterations" if self.consumed_before is None else "samples"}

    def schedule(self):
        """The learning-rate schedule (``ValueError`` for one that cannot run)."""
        from megatron_glm.training.lr_schedule import LRSchedule

        return LRSchedule(self.lr, self.min_lr, self.decay_style, self.warmup_iters, self.decay_iters,
                          self.wsd_decay_iters, self.wsd_style, self.consumed_before)


@dataclass(frozen=True)
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    interval: int | None = None
    keep_last: int = 0  # 0 keeps every checkpoint
    trust: bool = False
    load_optim: bool = True  # --no-load-optim: weights, iteration and data position only
    load_rng: bool = True
    finetune: bool = False  # weights only; iteration and data position from 0
    asynchronous: bool = False  # --async-save: host copy, then a background writer
    # a resumed lr schedule that differs from the checkpoint's: None refuses it, "flags" or "checkpoint" wins
    schedule_from: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    log_dir: str | None = None
    interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    tensorboard: bool = False
    wandb_project: str | None = None
    measure_memory: bool = False
    stop_file: str | None = None
    tensorboard_dir: str | None = None
    exit_interval: int | None = None
    exit_duration_mins: float | None = None
    eval_tasks: tuple = ()  # (kind, file) pairs of --eval-tasks, run every eval_interval


@dataclass(frozen=True)
class JobConfig:
    train_iters: int
    batches: BatchSchedule  # each step's global batch (Megatron's ramp-up, or constant)
    parallel: ParallelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    model: ModelConfig  # vocab_size 0 until model_config(tokenizer) fills it in
    seed: int = 1234
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16
    kernels: str = "auto"
    vocab_multiple: int = 128  # --make-vocab-size-divisible-by
    attention_impl: str = "auto"
    layernorm_impl: str = "torch"  # --layernorm-impl: torch | apex
    deepspeed_overrides: dict = field(default_factory=dict)  # --deepspeed-config's keys for the engine
    flags: dict = field(default_factory=dict)  # the command line's values: checkpoint meta, wandb, TensorBoard

    def model_config(self, padded_vocab_size: int) -> ModelConfig:
        """The model with the tokenizer's padded vocabulary, checked against the layout (the one layout check)."""
        from megatron_glm.parallel.pipeline import partition_layers
        from megatron_glm.parallel.state import check_layout

        cfg = dataclasses.replace(self.model, vocab_size=padded_vocab_size)
        cfg.validate(seq_length=self.data.seq_length)
        par = self.parallel
        check_layout(par.tensor * par.pipeline, par.tensor, par.pipeline, cfg.num_attention_heads,
                     cfg.hidden_size, cfg.vocab_size)
        per_chunk = par.layers_per_virtual_stage
        if per_chunk and cfg.num_layers % (par.pipeline * per_chunk):
            raise ValueError(f"--num-layers {cfg.num_layers} is not divisible by --pipeline-model-parallel-size "
                             f"{par.pipeline} x --num-layers-per-virtual-pipeline-stage {per_chunk}")
        partition_layers(cfg.num_layers, par.pipeline, par.virtual_stages(cfg.num_layers),
                         list(par.pipeline_layers) if par.pipeline_layers else None)  # an impossible split fails here
        return cfg


def objective_from_args(args) -> BlankInfillingConfig:
    """The blank-infilling objective the flags describe (glm-pretrain's, or a checkpoint's recorded ones)."""
    return BlankInfillingConfig(
        seq_length=args.seq_length, token_prob=args.bert_prob, sentence_prob=args.gap_sentence_prob,
        mask_ratio=args.mask_ratio, poisson_lambda=args.poisson_lambda, sentence_ratio=args.gap_sentence_ratio,
        gmask_min_ratio=args.gpt_min_ratio, gpt_infill_prob=args.gpt_infill_prob,
        block_mask_prob=args.block_mask_prob, context_mask_ratio=args.context_mask_ratio,
        context_mask_range=args.context_mask_range, random_position=args.random_position,
        shuffle_spans=not args.no_shuffle_blocks, single_span_prob=args.single_span_prob,
        short_seq_prob=args.short_seq_prob, task_mask=not args.no_task_mask, packed=args.packed_segments,
        seed=args.seed)


def recorded_args(flags: dict):
    """A checkpoint's recorded flags over glm-pretrain's defaults (a flag added since keeps its default)."""
    import argparse

    from megatron_glm.training.arguments import build_parser

    defaults = {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}
    return argparse.Namespace(**{**defaults, **flags})


def from_args(args, world_size: int) -> JobConfig:
    """The job the flags describe, or ``ValueError`` listing every flag that cannot work."""
    import argparse

    from megatron_glm.training import deepspeed_json
    from megatron_glm.training.arguments import model_config_from_args, validate_args

    validate_args(args, world_size)  # fills in the global batch size's default
    overrides = {}
    dp = max(world_size // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size), 1)
    if args.deepspeed_config:  # its keys win over the flags they set: the job holds the values that run
        overrides, changed, problems = deepspeed_json.fold(deepspeed_json.read(args.deepspeed_config), args, dp,
                                                          args.deepspeed_config)
        if problems:
            raise ValueError("; ".join(problems))
        for dest, value in changed.items():
            if getattr(args, dest) != value:
                flag = f"--{dest.replace('_', '-')}"
                logger.warning(f"--deepspeed-config {args.deepspeed_config} sets {value} over {flag} "
                               f"{getattr(args, dest)}")
        args = argparse.Namespace(**{**vars(args), **changed})
        validate_args(args, world_size)
    batches = BatchSchedule(args.global_batch_size, args.micro_batch_size * dp,
                            tuple(args.rampup_batch_size) if args.rampup_batch_size else None)
    if args.train_samples:  # Megatron's sample-based training: the lr lengths count samples too
        train_iters = batches.iterations_for(args.train_samples)
        if train_iters < 1:
            raise ValueError(f"--train-samples {args.train_samples} is less than one step of "
                             f"{batches.size_at(0)} samples")
        decay, warmup = args.lr_decay_samples or args.train_samples, args.lr_warmup_samples
        wsd_decay, consumed_before = args.lr_wsd_decay_samples, batches.consumed_before
    else:
        train_iters = args.train_iters
        decay, warmup, wsd_decay, consumed_before = args.lr_decay_iters or train_iters, args.lr_warmup_iters, \
            args.lr_wsd_decay_iters, None
    warmup = warmup or int(round((args.lr_warmup_fraction or 0.0) * decay))  # Megatron: a fraction of the decay
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    objective = objective_from_args(args)
    optimizer = OptimizerConfig(args.lr, args.min_lr, args.lr_decay_style, warmup, decay, args.weight_decay,
                                (args.adam_beta1, args.adam_beta2), args.adam_eps, args.clip_grad,
                                wsd_decay, args.lr_wsd_decay_style, consumed_before, args.optimizer_impl)
    optimizer.schedule()  # a schedule that cannot run fails here, before any work
    problems = []
    if args.attention_impl == "flex" and args.attention_dropout:
        problems.append(f"--attention-impl flex has no attention dropout: pass --attention-dropout 0 (not "
                        f"{args.attention_dropout}), or use --attention-impl flash")
    wants_apex = [f for f, v in (("--optimizer-impl apex", args.optimizer_impl == "apex"),
                                 ("--layernorm-impl apex", args.layernorm_impl == "apex")) if v]
    if wants_apex and not apex_available():
        problems.append(f"{' and '.join(wants_apex)} need{'s' if len(wants_apex) == 1 else ''} NVIDIA apex, which "
                        "is not installed here (it is not on "
                        "PyPI: NGC PyTorch containers have it); use --optimizer-impl fused-adamw and "
                        "--layernorm-impl torch")
    if problems:
        raise ValueError("; ".join(problems))
    return JobConfig(
        train_iters=train_iters, batches=batches,
        parallel=ParallelConfig(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.num_layers_per_virtual_pipeline_stage,
            tuple(args.pipeline_layers) if args.pipeline_layers else None, args.sequence_parallel,
            args.zero_stage, args.cpu_offload,
            (args.recompute_granularity, args.recompute_method, args.recompute_num_layers)),
        data=DataConfig(tuple(args.data_path), args.split, args.seq_length, args.data_cache_path, args.num_workers,
                        args.micro_batch_size, args.global_batch_size,
                        TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file),
                        objective),
        optimizer=optimizer,
        checkpoint=CheckpointConfig(args.save, args.load, args.save_interval, args.keep_last, args.trust_checkpoint,
                                    not args.no_load_optim, not args.no_load_rng, args.finetune, args.async_save,
                                    "flags" if args.override_opt_param_scheduler else
                                    "checkpoint" if args.use_checkpoint_opt_param_scheduler else None),
        logging=LoggingConfig(args.log_dir or args.save, args.log_interval, args.eval_interval, args.eval_iters,
                              args.tensorboard or bool(args.tensorboard_dir), args.wandb_project, args.measure_memory,
                              args.stop_file, args.tensorboard_dir, args.exit_interval, args.exit_duration_in_mins,
                              tuple(args.eval_tasks)),
        model=model_config_from_args(args, vocab_size=0, validate=False),
        seed=args.seed, device=args.device, precision=precision, kernels=args.kernels,
        vocab_multiple=args.make_vocab_size_divisible_by,
        attention_impl=args.attention_impl, layernorm_impl=args.layernorm_impl, deepspeed_overrides=overrides,
        flags={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))})
