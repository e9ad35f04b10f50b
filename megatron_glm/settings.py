"""The settings of a pretraining job, a dataclass per section, and the checks of each section.

Every field is a glm-pretrain flag (Megatron's name and meaning, ``flags.py``), with its default
and help written once beside it. ``Settings`` gathers the sections, checks them in one place
(``problems``: each section's own checks, then those across sections) and is what a checkpoint
records (``record``) and every reader of a checkpoint reads back (``recorded``), including
checkpoints that recorded the raw flags before the sections existed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_glm.config import ModelConfig, model_from_flags
from megatron_glm.data.blank_infilling import BlankInfillingConfig
from megatron_glm.data.eval_tasks import argparse_spec
from megatron_glm.data.tokenizer import TokenizerSpec
from megatron_glm.flags import read_flags, setting, value_of
from megatron_glm.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLS
from megatron_glm.optional import apex_available
from megatron_glm.parallel.pipeline import partition_layers, stage_layer_counts
from megatron_glm.parallel.state import ParallelLayoutError, check_layout

OPTIMIZER_IMPLS = ("adamw", "fused-adamw", "apex")
# Megatron's --lr-decay-style
DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
# meta.json's "settings" layout; checkpoints before it recorded the flags as "args"
RECORD_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class ImplementationConfig:
    """How the model's pieces run: the same mathematics, other kernels."""

    attention_softmax_in_fp32: bool = setting(
        False,
        "accepted for Megatron command lines: the attention softmax is always computed in fp32 here (every "
        "--attention-impl), its probabilities then cast to the compute dtype",
    )
    attention_impl: str = setting(
        "auto",
        "auto: the Triton GLM-mask flash kernel on CUDA, SDPA with a dense mask elsewhere",
        choices=ATTENTION_IMPLS,
    )
    kernels: str = setting(
        "auto",
        "fused kernels (attention, softmax, 2D embeddings, rotary): Triton on CUDA "
        "(auto), or force either side",
        choices=("auto", "triton", "torch"),
    )
    layernorm_impl: str = setting(
        "torch",
        "apex: apex's FusedLayerNorm (NVIDIA apex, not on PyPI: NGC containers have it)",
        choices=("torch", "apex"),
    )


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """The layout: tensor (+ sequence), pipeline and data parallelism with ZeRO, and recomputation."""

    tensor_model_parallel_size: int = setting(1)
    sequence_parallel: bool = setting(False, "LayerNorm and dropout on sequence chunks (TP>1)")
    pipeline_model_parallel_size: int = setting(1)
    num_layers_per_virtual_pipeline_stage: int | None = setting(
        None, "interleaved 1F1B: layers per model chunk (each rank holds several chunks)"
    )
    num_virtual_stages_per_pipeline_rank: int | None = setting(
        None,
        "interleaved 1F1B: model chunks per rank (Megatron's other way to say it; needed with an uneven split)",
    )
    pipeline_layers: tuple[int, ...] | None = setting(
        None, "explicit layer counts per (virtual) stage, instead of a uniform split"
    )
    decoder_first_pipeline_num_layers: int | None = setting(
        None,
        "layers of the first pipeline stage; the stages between the first and last split the rest evenly "
        "(Megatron's uneven split, e.g. GLM-130B's 70 layers on 8 stages: 8 + 6 x 9 + 8)",
    )
    decoder_last_pipeline_num_layers: int | None = setting(
        None, "layers of the last pipeline stage (as above)"
    )
    account_for_embedding_in_pipeline_split: bool = setting(
        False,
        "count the input embedding as a layer of the first pipeline stage when splitting the layers",
    )
    account_for_loss_in_pipeline_split: bool = setting(
        False,
        "count the output layer and loss as a layer of the last pipeline stage when splitting the layers",
    )
    recompute_granularity: str | None = setting(None, choices=("full", "selective"))
    recompute_method: str = setting("uniform", choices=("uniform", "block"))
    recompute_num_layers: int = setting(1)
    zero_stage: int = setting(0, choices=(0, 1, 2, 3))
    cpu_offload: bool = setting(False, "keep optimizer states in host memory (ZeRO >= 1)")
    make_vocab_size_divisible_by: int = setting(
        128, "pad the vocabulary to a multiple of this times the TP size (Megatron's padding)"
    )

    @property
    def recompute(self) -> tuple:
        """(granularity, method, layers): Megatron's recompute flags together."""
        return self.recompute_granularity, self.recompute_method, self.recompute_num_layers

    def virtual_stages(self, num_layers: int) -> int:
        """Model chunks per pipeline rank (1 without the interleaved schedule)."""
        per_chunk = self.num_layers_per_virtual_pipeline_stage
        if per_chunk:
            return num_layers // (self.pipeline_model_parallel_size * per_chunk)
        return self.num_virtual_stages_per_pipeline_rank or 1

    def layer_counts(self, num_layers: int) -> list[int] | None:
        """Layers of each virtual stage (``partition_layers``' order) when the split is not uniform: --pipeline-layers,
        or Megatron's uneven-split flags. ``ValueError`` for a split that cannot be made."""
        if self.pipeline_layers:
            return list(self.pipeline_layers)
        return stage_layer_counts(
            num_layers,
            self.pipeline_model_parallel_size,
            self.virtual_stages(num_layers),
            self.decoder_first_pipeline_num_layers,
            self.decoder_last_pipeline_num_layers,
            self.account_for_embedding_in_pipeline_split,
            self.account_for_loss_in_pipeline_split,
        )

    @property
    def uneven_flags(self) -> list[str]:
        """Megatron's uneven-split flags that were given."""
        return [
            flag
            for flag, value in (
                (
                    "--decoder-first-pipeline-num-layers",
                    self.decoder_first_pipeline_num_layers is not None,
                ),
                (
                    "--decoder-last-pipeline-num-layers",
                    self.decoder_last_pipeline_num_layers is not None,
                ),
                (
                    "--account-for-embedding-in-pipeline-split",
                    self.account_for_embedding_in_pipeline_split,
                ),
                ("--account-for-loss-in-pipeline-split", self.account_for_loss_in_pipeline_split),
            )
            if value
        ]

    def data_parallel_size(self, world_size: int) -> int:
        return max(
            world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size), 1
        )

    def problems(self, world_size: int) -> list[str]:
        found = []
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        try:  # the sizes that need the model (heads, hidden, vocabulary) are checked once the tokenizer is known
            check_layout(world_size, tp, pp)
        except ParallelLayoutError as e:
            found.append(str(e))
            tp = pp = 1
        if self.cpu_offload and self.zero_stage < 1:
            found.append(
                "--cpu-offload needs --zero-stage 1, 2 or 3 (the optimizer states must be partitioned)"
            )
        if pp > 1 and self.zero_stage >= 2:
            found.append(
                f"--zero-stage {self.zero_stage} cannot be combined with pipeline parallelism (DeepSpeed "
                "partitions gradients that the pipeline schedule accumulates); use --zero-stage 0 or 1"
            )
        per_chunk, chunks = (
            self.num_layers_per_virtual_pipeline_stage,
            self.num_virtual_stages_per_pipeline_rank,
        )
        for flag, value in (
            ("--num-layers-per-virtual-pipeline-stage", per_chunk),
            ("--num-virtual-stages-per-pipeline-rank", chunks),
        ):
            if value is not None and value < 1:
                found.append(f"{flag} must be positive")
            elif value is not None and pp == 1:
                found.append(
                    f"{flag} interleaves pipeline stages: it needs --pipeline-model-parallel-size > 1"
                )
        if per_chunk is not None and chunks is not None:
            found.append(
                "--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank both set the "
                "interleaving: pass one"
            )
        if per_chunk is not None and self.uneven_flags:
            found.append(
                f"{', '.join(self.uneven_flags)} split the layers unevenly, so chunks differ in size: give the "
                "interleaving as --num-virtual-stages-per-pipeline-rank (Megatron's rule)"
            )
        if self.pipeline_layers and self.uneven_flags:
            found.append(
                f"--pipeline-layers gives every stage's layers; {', '.join(self.uneven_flags)} would split them "
                "another way: pass one"
            )
        if self.uneven_flags and pp == 1:
            found.append(
                f"{', '.join(self.uneven_flags)} split the layers over pipeline stages: they need "
                "--pipeline-model-parallel-size > 1"
            )
        if self.sequence_parallel and tp == 1:
            found.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.recompute_num_layers < 1:
            found.append("--recompute-num-layers must be at least 1")
        if self.make_vocab_size_divisible_by < 1:
            found.append("--make-vocab-size-divisible-by must be positive")
        return found


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The corpus and how it is read."""

    data_path: tuple[str, ...] = setting(
        (), "prefix, or weight/prefix pairs: 0.7 A 0.3 B", required=True
    )
    split: str = setting("949,50,1")
    seq_length: int = setting(512)
    data_cache_path: str | None = setting(
        None, "sample-index cache (default: index-cache/ beside the data)"
    )
    num_workers: int = setting(
        2,
        "data-loader worker processes per rank that read and collate micro-batches ahead "
        "of the step; 0 collates in the training process",
    )

    def problems(self) -> list[str]:
        if self.num_workers < 0:
            return [
                f"--num-workers {self.num_workers}: use 0 (collate in the training process) or more"
            ]
        return []


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """How long and on what: batches, length, seed, precision, device, and when to stop early."""

    micro_batch_size: int = setting(4)
    global_batch_size: int | None = setting(None, "default: micro batch x data-parallel size")
    train_iters: int | None = setting(None, "steps to train (or --train-samples)")
    train_samples: int | None = setting(
        None,
        "samples to train, Megatron's sample-based training: the steps follow from the global batch (and "
        "--rampup-batch-size); the lr lengths are then --lr-*-samples",
    )
    rampup_batch_size: tuple[int, int, int] | None = setting(
        None,
        "start at START samples a step and grow by INCREMENT until --global-batch-size, over SAMPLES samples "
        "(needs --train-samples)",
        nargs=3,
        metavar=("START", "INCREMENT", "SAMPLES"),
    )
    seed: int = setting(1234)
    bf16: bool = setting(False)
    fp16: bool = setting(False)
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    deepspeed_config: str | None = setting(
        None,
        "a DeepSpeed JSON; its keys override the flags that set them (ZeRO stage and offload, clipping, "
        "bf16/fp16, an Adam/AdamW optimizer block); a scheduler block or batch sizes that contradict the flags are "
        "refused",
        aliases=("--deepspeed_config",),
    )
    deepspeed: bool = setting(
        False,
        "accepted for Megatron-DeepSpeed and THUDM/GLM command lines: DeepSpeed always runs here",
    )
    # launchers
    local_rank: int | None = setting(
        None, name="--local_rank", aliases=("--local-rank",), hidden=True
    )
    stop_file: str | None = setting(
        None,
        "stop after the current step, save and exit 75 (requeue) once this file "
        "exists; SIGTERM and SIGUSR1 do the same",
    )
    exit_interval: int | None = setting(
        None,
        "save and exit (status 0) after the first iteration divisible by this (Megatron's flag)",
    )
    exit_duration_in_mins: float | None = setting(
        None,
        "save and exit (status 0) after the first iteration that ends past this many minutes of training; the "
        "same command continues",
    )
    exit_signal_handler: bool = setting(
        False, "accepted for Megatron command lines: SIGTERM and SIGUSR1 always save and exit here"
    )

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def batch_size(self, data_parallel_size: int) -> int:
        """The global batch: ``--global-batch-size``, by default one micro-batch per data-parallel rank."""
        return self.global_batch_size or self.micro_batch_size * data_parallel_size

    def batch_problem(self, data_parallel_size: int) -> str | None:
        step = self.micro_batch_size * data_parallel_size
        if self.micro_batch_size < 1 or self.batch_size(data_parallel_size) % step:
            return (
                f"--global-batch-size {self.batch_size(data_parallel_size)} is not a multiple of "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        return None

    def problems(self, data_parallel_size: int) -> list[str]:
        found = []
        if self.bf16 and self.fp16:
            found.append("--bf16 and --fp16 exclude each other")
        batch = self.batch_problem(data_parallel_size)
        if batch:
            found.append(batch)
        if self.exit_interval is not None and self.exit_interval < 1:
            found.append("--exit-interval must be positive")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            found.append("--exit-duration-in-mins must be positive")
        return found


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule (Megatron's flags; lengths in iterations or in samples)."""

    lr: float = setting(1e-4)
    min_lr: float = setting(0.0)
    lr_decay_style: str = setting("cosine", choices=DECAY_STYLES)
    lr_wsd_decay_iters: int | None = setting(
        None, "WSD: the last iterations of the decay, where the rate falls from --lr to --min-lr"
    )
    lr_wsd_decay_style: str = setting("exponential", choices=WSD_STYLES)
    lr_decay_iters: int | None = setting(None, "default: --train-iters")
    lr_decay_samples: int | None = setting(None, "with --train-samples; default: --train-samples")
    lr_warmup_samples: int = setting(0, "with --train-samples")
    lr_wsd_decay_samples: int | None = setting(None, "with --train-samples: WSD's decay")
    lr_warmup_fraction: float | None = setting(
        None, "warm-up as a fraction of the decay iterations (--lr-decay-iters), Megatron's meaning"
    )
    lr_warmup_iters: int = setting(0)
    optimizer_impl: str = setting(
        "adamw",
        "adamw: torch's AdamW (foreach); fused-adamw: its fused kernel; apex: apex's FusedAdam",
        choices=OPTIMIZER_IMPLS,
    )
    weight_decay: float = setting(0.01)
    adam_beta1: float = setting(0.9)
    adam_beta2: float = setting(0.999)
    adam_eps: float = setting(1e-8)
    clip_grad: float = setting(1.0)

    @property
    def betas(self) -> tuple[float, float]:
        return self.adam_beta1, self.adam_beta2

    def problems(self) -> list[str]:
        found = []
        if not self.clip_grad >= 0:
            found.append(
                f"--clip-grad {self.clip_grad}: give a gradient norm >= 0 (0 turns clipping off)"
            )
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction <= 1:
            found.append("--lr-warmup-fraction must be in [0, 1]")
        if self.lr_warmup_fraction is not None and (self.lr_warmup_iters or self.lr_warmup_samples):
            found.append(
                "--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples both set the warm-up: "
                "pass one"
            )
        return found


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where checkpoints go, what a run takes from one, and how it saves."""

    save: str | None = setting(None, "checkpoint folder")
    load: str | None = setting(
        None, "resume from this folder's latest checkpoint (default: --save, when it holds one)"
    )
    trust_checkpoint: bool = setting(
        False,
        "load --load's files with unrestricted unpickling (they can run code): only for files from a source "
        "you trust that hold objects beyond tensors, numbers and DeepSpeed's optimizer states",
    )
    load_optim: bool = setting(
        True,
        "from --load take the weights, iteration and data position, not the optimizer or lr schedule (Adam "
        "moments and the warm-up start again, as in Megatron)",
        name="--no-load-optim",
        negate=True,
    )
    load_rng: bool = setting(
        True, "do not restore --load's random states (--seed's)", name="--no-load-rng", negate=True
    )
    finetune: bool = setting(
        False,
        "from --load take only the weights: iteration, data position, optimizer, lr schedule and RNG start "
        "fresh. A restarted job that finds its own checkpoint in --save resumes that",
    )
    override_opt_param_scheduler: bool = setting(
        False,
        "on resume, switch to the lr schedule the flags give, from the checkpoint's step on (Megatron's "
        "flag); without it a schedule that differs from the checkpoint's is refused",
        name="--override-opt_param-scheduler",
    )
    use_checkpoint_opt_param_scheduler: bool = setting(
        False,
        "on resume, continue the checkpoint's lr schedule whatever the lr flags say (Megatron's flag)",
        name="--use-checkpoint-opt_param-scheduler",
    )
    save_interval: int | None = setting(None)
    async_save: bool = setting(
        False,
        "copy each checkpoint to host memory and write it in the background while training goes on (one save "
        "in flight; the next save and the end of the run wait for it)",
    )
    keep_last: int = setting(
        0,
        "keep the newest N checkpoints, delete older ones; 0 (the default, as in Megatron) "
        "keeps all",
    )

    @property
    def schedule_from(self) -> str | None:
        """Which lr schedule wins on a resume where they differ: "flags", "checkpoint", or None (refuse)."""
        return (
            "flags"
            if self.override_opt_param_scheduler
            else "checkpoint"
            if self.use_checkpoint_opt_param_scheduler
            else None
        )

    def problems(self) -> list[str]:
        found = []
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            found.append(
                "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other: "
                "pass the one whose schedule the run should follow"
            )
        if (self.finetune or not self.load_optim or not self.load_rng) and not self.load:
            found.append(
                "--finetune, --no-load-optim and --no-load-rng say what to take from --load: pass --load"
            )
        if self.save_interval is not None and self.save_interval < 1:
            found.append("--save-interval must be positive")
        if self.save_interval and not self.save:
            found.append("--save-interval needs --save")
        if self.async_save and not self.save:
            found.append("--async-save needs --save")
        return found


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """What a run reports, where, and how often it validates."""

    eval_interval: int = setting(1000)
    eval_tasks: tuple[tuple[str, str], ...] = setting(
        (),
        "zero-shot tasks run every --eval-interval on the training model and logged like the losses: "
        "blank:FILE (held-out documents), choice:FILE (multiple choice), lambada:FILE; JSONL, as glm-eval reads "
        "them",
        metavar="KIND:FILE",
        type=argparse_spec,
    )
    eval_iters: int = setting(
        10, "global batches per validation (Megatron's count), split over the data-parallel ranks"
    )
    log_interval: int = setting(10)
    log_dir: str | None = setting(None, "metrics.jsonl and TensorBoard events (default: --save)")
    log_all_ranks: bool = setting(
        False, "every rank's log records on the console (default: rank 0's, and warnings from all)"
    )
    tensorboard: bool = setting(False, "write TensorBoard events (needs tensorboard)")
    tensorboard_dir: str | None = setting(
        None, "where TensorBoard events go (implies --tensorboard; default: {log dir}/tensorboard)"
    )
    measure_memory: bool = setting(
        False,
        "write memory_rank{R}.json to the log folder: bytes live after set-up and the peak over the steps "
        "(CUDA allocator counters; on CPU, allocations recorded by the profiler, which keeps every event: for runs "
        "of a few steps)",
    )
    wandb_project: str | None = setting(
        None, "log to Weights & Biases (offline unless WANDB_MODE/API key say otherwise)"
    )

    def problems(self) -> list[str]:
        if self.eval_interval < 1 or self.log_interval < 1:
            return ["--eval-interval and --log-interval must be positive"]
        return []


SECTIONS = {
    "model": ModelConfig,
    "implementation": ImplementationConfig,
    "parallel": ParallelConfig,
    "objective": BlankInfillingConfig,
    "data": DataConfig,
    "tokenizer": TokenizerSpec,
    "training": TrainingConfig,
    "optimizer": OptimizerConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything glm-pretrain was told, a section each; the model's vocabulary is 0 until the tokenizer is read."""

    preset: str | None = None
    model: ModelConfig
    implementation: ImplementationConfig
    parallel: ParallelConfig
    objective: BlankInfillingConfig
    data: DataConfig
    tokenizer: TokenizerSpec
    training: TrainingConfig
    optimizer: OptimizerConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig

    @classmethod
    def from_flags(cls, values) -> "Settings":
        """From parsed flags (an argparse namespace, or the flags an older checkpoint recorded)."""
        data = read_flags(DataConfig, values)
        training = read_flags(TrainingConfig, values)
        model = model_from_flags(values, 0, data.seq_length)
        return cls(
            preset=value_of(values, "preset"),
            model=model,
            implementation=read_flags(ImplementationConfig, values),
            parallel=read_flags(ParallelConfig, values),
            objective=read_flags(
                BlankInfillingConfig,
                values,
                seq_length=data.seq_length,
                seed=training.seed,
                positions_1d=model.positions_1d,
            ),
            data=data,
            tokenizer=read_flags(TokenizerSpec, values),
            training=training,
            optimizer=read_flags(OptimizerConfig, values),
            checkpoint=read_flags(CheckpointConfig, values),
            logging=read_flags(LoggingConfig, values),
        )

    def problems(self, world_size: int) -> list[str]:
        """Everything that can be checked before a process group, a tokenizer or data is touched."""
        par, train, ckpt = self.parallel, self.training, self.checkpoint
        dp = par.data_parallel_size(world_size)
        found = (
            par.problems(world_size)
            + self.data.problems()
            + train.problems(dp)
            + self._length_problems()
            + self.optimizer.problems()
            + ckpt.problems()
            + self.logging.problems()
        )
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        if par.sequence_parallel and tp > 0 and self.data.seq_length % tp:
            found.append(
                f"--sequence-parallel needs --seq-length {self.data.seq_length} divisible by the TP size {tp}"
            )
        if self.logging.measure_memory and not (self.logging.log_dir or ckpt.save):
            found.append(
                "--measure-memory needs --log-dir or --save (where memory_rank{R}.json goes)"
            )
        if self.implementation.attention_impl == "flex" and self.model.attention_dropout:
            found.append(
                f"--attention-impl flex has no attention dropout: pass --attention-dropout 0 (not "
                f"{self.model.attention_dropout}), or use --attention-impl flash"
            )
        found += self._apex_problems()
        if not found:
            found += self._split_problems()
        if (
            (par.num_layers_per_virtual_pipeline_stage or par.num_virtual_stages_per_pipeline_rank)
            and pp > 1
            and not found
        ):
            micro = train.batch_size(dp) // (train.micro_batch_size * dp)
            if micro % pp:
                found.append(
                    f"the interleaved schedule needs micro-batches per step ({micro}) divisible by "
                    f"--pipeline-model-parallel-size {pp}"
                )
        return found

    def _split_problems(self) -> list[str]:
        """Whether the model's layers split over the pipeline stages as the flags say."""
        par, layers = self.parallel, self.model.num_layers
        pp, per_chunk = par.pipeline_model_parallel_size, par.num_layers_per_virtual_pipeline_stage
        if per_chunk and layers % (pp * per_chunk):
            return [
                f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp} x "
                f"--num-layers-per-virtual-pipeline-stage {per_chunk}"
            ]
        try:
            partition_layers(layers, pp, par.virtual_stages(layers), par.layer_counts(layers))
        except ValueError as e:
            return [str(e)]
        return []

    def _length_problems(self) -> list[str]:
        """Megatron's two ways to say how long to train, and the lr lengths (and ramp-up) that go with each."""
        train, opt = self.training, self.optimizer

        def given(*pairs):
            return [flag for flag, value in pairs if value]

        if (train.train_iters is None) == (train.train_samples is None):
            return ["pass one of --train-iters (steps) and --train-samples (samples)"]
        if train.train_iters is not None:
            wrong = given(
                ("--lr-decay-samples", opt.lr_decay_samples),
                ("--lr-warmup-samples", opt.lr_warmup_samples),
                ("--lr-wsd-decay-samples", opt.lr_wsd_decay_samples),
                ("--rampup-batch-size", train.rampup_batch_size),
            )
            found = ["--train-iters must be positive"] if train.train_iters < 1 else []
            if wrong:
                found.append(
                    f"{', '.join(wrong)} go with --train-samples; with --train-iters use the --lr-*-iters "
                    "flags (a batch-size ramp-up needs sample-based training, as in Megatron)"
                )
            return found
        wrong = given(
            ("--lr-decay-iters", opt.lr_decay_iters),
            ("--lr-warmup-iters", opt.lr_warmup_iters),
            ("--lr-wsd-decay-iters", opt.lr_wsd_decay_iters),
        )
        found = ["--train-samples must be positive"] if train.train_samples < 1 else []
        if wrong:
            found.append(
                f"{', '.join(wrong)} go with --train-iters; with --train-samples use --lr-decay-samples, "
                "--lr-warmup-samples and --lr-wsd-decay-samples"
            )
        return found

    def _apex_problems(self) -> list[str]:
        wants = [
            f
            for f, v in (
                ("--optimizer-impl apex", self.optimizer.optimizer_impl == "apex"),
                ("--layernorm-impl apex", self.implementation.layernorm_impl == "apex"),
            )
            if v
        ]
        if not wants or apex_available():
            return []
        return [
            f"{' and '.join(wants)} need{'s' if len(wants) == 1 else ''} NVIDIA apex, which is not installed "
            "here (it is not on PyPI: NGC PyTorch containers have it); use --optimizer-impl fused-adamw and "
            "--layernorm-impl torch"
        ]

    def record(self) -> dict:
        """What a checkpoint stores: every section by field name, under the record's format version."""
        return {
            "format": RECORD_FORMAT,
            "preset": self.preset,
            **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS},
        }


def _section(cls, values: dict):
    """A section from its recorded fields; a field recorded by a newer version is left out, one it lacks keeps
    its default."""
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {
        k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        for k, v in values.items()
        if k in names
    }
    return cls(**kept)


def recorded(meta: dict) -> Settings:
    """The settings a checkpoint's ``meta.json`` records: its sections, or for a checkpoint written before
    they existed, the flags it recorded (over today's defaults). The model is the checkpoint's own."""
    record = meta.get("settings")
    model = (
        ModelConfig.from_dict(meta["model"])
        if isinstance(meta.get("model"), dict)
        else ModelConfig()
    )
    if isinstance(record, dict):
        sections = {
            name: _section(cls, record.get(name) or {})
            for name, cls in SECTIONS.items()
            if name not in ("model", "objective", "data")
        }
        data = _section(DataConfig, {"data_path": (), **(record.get("data") or {})})
        objective = _section(
            BlankInfillingConfig,
            {
                "seq_length": data.seq_length,
                **(record.get("objective") or {}),
                "positions_1d": model.positions_1d,
            },
        )
        return Settings(
            preset=record.get("preset"), model=model, objective=objective, data=data, **sections
        )
    flags = {"data_path": (), **(meta.get("args") or {})}
    settings = Settings.from_flags(flags)
    objective = dataclasses.replace(settings.objective, positions_1d=model.positions_1d)
    return dataclasses.replace(settings, model=model, objective=objective)
