"""The pretraining job the Trainer is built from: the settings, and what follows from them.

``glm-pretrain`` turns its flags into ``Settings`` (``megatron_glm/settings.py``) and checks
them in one place (``from_args``), before a process group, data or a model exists; the
argparse namespace goes no further. What follows from the settings is worked out there too:
the number of steps, each step's batch, the lr schedule's lengths, the device, a DeepSpeed
JSON's keys. The model's configuration needs the tokenizer (the padded vocabulary), so
``JobConfig.model_config`` completes it once the tokenizer is loaded, and the layout check
that needs the model's sizes runs then, once.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.parallel.pipeline import partition_layers
from megatron_glm.parallel.state import check_layout
from megatron_glm.settings import ParallelConfig, Settings
from megatron_glm.training import deepspeed_json
from megatron_glm.training.batch_schedule import BatchSchedule
from megatron_glm.training.lr_schedule import LRSchedule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleConfig:
    """The lr schedule that runs: the flags' lengths resolved (iterations, or samples with --train-samples)."""

    lr: float
    min_lr: float
    decay_style: str
    warmup: int
    decay: int
    wsd_decay: int | None
    wsd_style: str
    # sample-based training (--train-samples): step -> samples before it; the lengths above then count samples
    consumed_before: Callable[[int], int] | None = None

    def record(self) -> dict:
        """What a checkpoint records of the schedule, to hold a resume to it (Megatron's checked values)."""
        return {
            "lr": self.lr,
            "min_lr": self.min_lr,
            "decay_style": self.decay_style,
            "warmup": self.warmup,
            "decay": self.decay,
            "wsd_decay": self.wsd_decay,
            "wsd_style": self.wsd_style,
            "counts": "iterations" if self.consumed_before is None else "samples",
        }

    def build(self) -> LRSchedule:
        """The schedule (``ValueError`` for one that cannot run)."""
        return LRSchedule(
            self.lr,
            self.min_lr,
            self.decay_style,
            self.warmup,
            self.decay,
            self.wsd_decay,
            self.wsd_style,
            self.consumed_before,
        )

    def following(self, saved: dict) -> "ScheduleConfig":
        """This schedule with a checkpoint's recorded values (``--use-checkpoint-opt_param-scheduler``)."""
        return dataclasses.replace(
            self,
            lr=saved["lr"],
            min_lr=saved["min_lr"],
            decay_style=saved["decay_style"],
            warmup=saved["warmup"],
            decay=saved["decay"],
            wsd_decay=saved["wsd_decay"],
            wsd_style=saved["wsd_style"],
        )


@dataclass(frozen=True)
class JobConfig:
    """What glm-pretrain runs: the settings as given (and recorded in checkpoints), and what follows from them."""

    settings: Settings
    train_iters: int
    batches: BatchSchedule  # each step's global batch (Megatron's ramp-up, or constant)
    schedule: ScheduleConfig
    device: str  # cpu or cuda: --device auto resolved
    # --deepspeed-config's keys for the engine
    deepspeed_overrides: dict = field(default_factory=dict)

    # the sections the Trainer reads most, by their names
    parallel = property(lambda self: self.settings.parallel)
    data = property(lambda self: self.settings.data)
    training = property(lambda self: self.settings.training)
    optimizer = property(lambda self: self.settings.optimizer)
    checkpoint = property(lambda self: self.settings.checkpoint)
    logging = property(lambda self: self.settings.logging)

    @property
    def global_batch_size(self) -> int:
        return self.batches.global_batch_size

    @property
    def log_dir(self) -> str | None:
        """Where metrics.jsonl and TensorBoard events go: --log-dir, else --save."""
        return self.logging.log_dir or self.checkpoint.save

    def model_config(self, padded_vocab_size: int) -> ModelConfig:
        """The model with the tokenizer's padded vocabulary, checked against the layout (the one layout check)."""
        cfg = dataclasses.replace(self.settings.model, vocab_size=padded_vocab_size)
        cfg.validate(seq_length=self.data.seq_length)
        par = self.parallel
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        check_layout(tp * pp, tp, pp, cfg.num_attention_heads, cfg.hidden_size, cfg.vocab_size)
        return cfg

    def stages(self, num_layers: int) -> list[list[range]]:
        """The global layer ids of each pipeline rank's chunks (checked in ``Settings.problems``)."""
        par = self.parallel
        return partition_layers(
            num_layers,
            par.pipeline_model_parallel_size,
            par.virtual_stages(num_layers),
            par.layer_counts(num_layers),
        )


def resolve_device(settings: Settings, elsewhere: str | None = None) -> tuple[str, list[str]]:
    """(cpu or cuda, problems): ``--device auto`` is CUDA when a GPU is visible; what this device cannot run.

    ``elsewhere``: the device of machines other than this one (a dry run's), taken as present."""
    wanted = settings.training.device
    visible = torch.cuda.is_available() if elsewhere is None else elsewhere == "cuda"
    device = wanted if wanted != "auto" else ("cuda" if visible else "cpu")
    found = []
    if device == "cuda" and not visible:
        found.append(
            "--device cuda, but no CUDA GPU is visible here (or this torch is a CPU build); use --device "
            "cpu, or auto"
        )
    if settings.implementation.attention_impl == "flex" and device == "cpu":
        found.append(
            "--attention-impl flex trains on GPUs only (FlexAttention has no backward on the CPU); use "
            "--attention-impl sdpa here"
        )
    if settings.training.precision == "fp16" and device == "cpu":
        found.append(
            "--fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 optimizer); use --bf16 on CPU"
        )
    return device, found


def _fold_deepspeed_json(
    args: argparse.Namespace, world_size: int
) -> tuple[argparse.Namespace, dict]:
    """(the flags with ``--deepspeed-config``'s keys over them, what the engine gets from the JSON)."""
    path = args.deepspeed_config
    if not path:
        return args, {}
    dp = ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    ).data_parallel_size(world_size)
    batch = args.global_batch_size or args.micro_batch_size * dp
    overrides, changed, problems = deepspeed_json.fold(
        deepspeed_json.read(path), args.micro_batch_size, batch, dp, path
    )
    if problems:
        raise ValueError("; ".join(problems))
    for dest, value in changed.items():
        if getattr(args, dest) != value:
            logger.warning(
                f"--deepspeed-config {path} sets {value} over --{dest.replace('_', '-')} "
                f"{getattr(args, dest)}"
            )
    return argparse.Namespace(**{**vars(args), **changed}), overrides


def _lr_schedule(settings: Settings, batches: BatchSchedule, train_iters: int) -> ScheduleConfig:
    """Megatron's lr lengths: in samples for --train-samples, in iterations otherwise; a warm-up fraction of the
    decay."""
    opt, samples = settings.optimizer, settings.training.train_samples
    if samples:
        decay, warmup, wsd_decay, consumed_before = (
            opt.lr_decay_samples or samples,
            opt.lr_warmup_samples,
            opt.lr_wsd_decay_samples,
            batches.consumed_before,
        )
    else:
        decay, warmup, wsd_decay, consumed_before = (
            opt.lr_decay_iters or train_iters,
            opt.lr_warmup_iters,
            opt.lr_wsd_decay_iters,
            None,
        )
    warmup = warmup or int(round((opt.lr_warmup_fraction or 0.0) * decay))
    return ScheduleConfig(
        opt.lr,
        opt.min_lr,
        opt.lr_decay_style,
        warmup,
        decay,
        wsd_decay,
        opt.lr_wsd_decay_style,
        consumed_before,
    )


def from_args(args: argparse.Namespace, world_size: int, elsewhere: str | None = None) -> JobConfig:
    """The job the flags describe, or ``ValueError`` listing every flag that cannot work
    (``elsewhere``: the device the job runs on when that is not this machine, for a dry run)."""
    # its keys win: the settings hold the values that run
    args, overrides = _fold_deepspeed_json(args, world_size)
    settings = Settings.from_flags(args)
    problems = settings.problems(world_size)
    device, device_problems = resolve_device(settings, elsewhere)
    problems += device_problems
    train, par = settings.training, settings.parallel
    dp = par.data_parallel_size(world_size)
    batches = BatchSchedule(
        train.batch_size(dp), train.micro_batch_size * dp, train.rampup_batch_size
    )
    if train.batch_problem(dp) is None:
        problems += batches.problems()
    if problems:
        raise ValueError("; ".join(problems))
    train_iters = (
        batches.iterations_for(train.train_samples) if train.train_samples else train.train_iters
    )
    if train_iters < 1:
        raise ValueError(
            f"--train-samples {train.train_samples} is less than one step of {batches.size_at(0)} "
            "samples"
        )
    schedule = _lr_schedule(settings, batches, train_iters)
    schedule.build()  # a schedule that cannot run fails here, before any work
    return JobConfig(settings, train_iters, batches, schedule, device, overrides)
