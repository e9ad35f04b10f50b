"""The Trainer: glm-pretrain's job built from its config, component by component, then the loop.

Each component comes from a named builder (data, model, engine, checkpointer, metrics,
preemption); ``train_step`` runs one optimizer step, ``evaluate`` one validation pass,
``train`` the loop with its logging, saves and stop requests, and ``close`` releases what the
set-up started. Everything that depends on randomness is seeded or checkpointed, so a resumed
run repeats an uninterrupted one exactly (bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import random
import time

import numpy as np
import torch

from megatron_glm import checkpoint as ckpt
from megatron_glm import faults, kernels, serialization
from megatron_glm.checkpoint import universal
from megatron_glm.config import ModelConfig
from megatron_glm.data import eval_tasks
from megatron_glm.data.blank_infilling import (
    OBJECTIVES,
    BlankInfillingCollator,
    SpecialIds,
    sentence_end_ids,
)
from megatron_glm.data.blended_dataset import build_train_valid_test_datasets
from megatron_glm.data.loader import BatchStream, MicroBatches, collate_now
from megatron_glm.data.sampler import PretrainingSampler
from megatron_glm.data.tokenizer import GLMTokenizer
from megatron_glm.model.parallelize import (
    RankLayout,
    build_rank_model,
    count_parameters,
)
from megatron_glm.parallel import state
from megatron_glm.parallel.pipeline_stage import TiedEmbedding
from megatron_glm.parallel.random import model_parallel_seed
from megatron_glm.training.config import JobConfig
from megatron_glm.training.engine import build_engine, init_distributed, numel, zero3_partitioner
from megatron_glm.training.lr_schedule import schedule_differences
from megatron_glm.training.memory import host_memory, reset_host_peak
from megatron_glm.training.metrics import MetricsLogger, Throughput, flops_per_token, memory_summary
from megatron_glm.training.preemption import DURATION, EXIT_INTERRUPTED, EXIT_REQUEUE, Preemption
from megatron_glm.training.step import StepRunner, score_count, spread_scores

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that must stop (a non-finite loss, say); the last complete checkpoint stays the latest."""


def check_writable(flag: str, folder: str) -> None:
    """Refuse a folder nothing can be written to before any work, rather than at the first save.

    It probes the folder, or the nearest existing one above it, with a file it removes at once:
    a refused run leaves nothing behind, not even the folder.
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    probe = os.path.join(existing, f".write-test-{os.getpid()}")
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(20, "Not a directory", existing)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"{flag} {folder}: cannot write there ({e.strerror}); choose a folder you can write to"
        ) from None


def build_data(job: JobConfig, tokenizer: GLMTokenizer, vocab_size: int):
    """(train, valid) micro-batch datasets: samples read and collated by the blank-infilling objective."""
    data, log = job.data, job.logging
    n_eval = log.eval_iters * job.global_batch_size if log.eval_interval <= job.train_iters else 0
    train, valid, _ = build_train_valid_test_datasets(
        list(data.data_path),
        data.split,
        data.seq_length,
        [job.batches.consumed_before(job.train_iters), n_eval, 0],
        seed=job.training.seed,
        cache_dir=data.data_cache_path,
        tokenizer=tokenizer,
    )
    objective = job.settings.objective
    ends = sentence_end_ids(tokenizer) if objective.sentence_prob > 0 else None
    collate = BlankInfillingCollator(objective, SpecialIds.from_tokenizer(tokenizer), ends)
    return (
        MicroBatches(train, collate, vocab_size),
        MicroBatches(valid, collate, vocab_size) if valid is not None else None,
    )


def build_loader(job: JobConfig, batches: MicroBatches, consumed: int, device: str) -> BatchStream:
    """This data-parallel rank's micro-batches from ``consumed`` samples on, collated in the loader's workers."""
    sampler = PretrainingSampler(
        len(batches),
        consumed,
        job.training.micro_batch_size,
        state.get_data_parallel_rank(),
        state.get_data_parallel_world_size(),
    )
    return BatchStream(batches, sampler, job.data.num_workers, pin_memory=device == "cuda")


def build_model(
    job: JobConfig, model_cfg: ModelConfig, resume: ckpt.ResumePoint | None, engine_steps: int
):
    """(this rank's chunks, host memory peak of the build or None): only its shard is ever built, and with
    ZeRO-3 only its data-parallel partition of it (each parameter partitioned as soon as it exists)."""
    par = job.parallel
    layout = RankLayout.from_state(
        par.virtual_stages(model_cfg.num_layers), par.layer_counts(model_cfg.num_layers)
    )
    trust = job.checkpoint.trust_checkpoint
    weights = None
    if resume is not None and resume.weights_only:  # a glm-convert output: this rank's file only

        def weights(chunks):
            return ckpt.read_weights_only(
                resume.load_dir, resume.tag, layout.pp_rank, layout.tp_rank, layout.tp, trust
            )
    # this rank's parameters, one at a time, sliced to its TP shard
    elif resume is not None and resume.reshard:
        weights = universal.reader_for(
            resume, layout, model_cfg.geglu, trust, model_cfg.vocab_size
        ).weights
    # the meta kernels' one-time imports (~150 MB), not weights
    torch.nn.init.normal_(torch.empty(1, device="meta"))
    reset_host_peak()
    before = host_memory()
    impl = job.settings.implementation
    partition = None
    if par.zero_stage == 3:
        partition = zero3_partitioner(job, engine_steps, count_parameters(model_cfg, layout.tp))
    chunks = build_rank_model(
        model_cfg,
        layout,
        job.training.seed,
        par.sequence_parallel,
        par.recompute,
        impl.attention_impl,
        weights=weights,
        layernorm_impl=impl.layernorm_impl,
        partition=partition,
    )
    after = host_memory()
    return chunks, (after["peak_rss_bytes"] - before["rss_bytes"]) if after else None


def build_tasks(job: JobConfig, tokenizer: GLMTokenizer) -> list[tuple]:
    """``--eval-tasks``: (name, kind, rows, labels) each, rows at most a training sequence long."""
    return [
        (
            eval_tasks.task_name(kind, path),
            kind,
            *eval_tasks.build(kind, path, tokenizer, job.data.seq_length, job.training.seed),
        )
        for kind, path in job.logging.eval_tasks
    ]


def build_metrics(job: JobConfig, rank: int, start: int) -> MetricsLogger:
    """The run's metrics from iteration ``start`` on (rows a resumed run redoes are set aside first)."""
    log = job.logging
    return MetricsLogger(
        job.log_dir,
        log.tensorboard or bool(log.tensorboard_dir),
        log.wandb_project,
        job.settings.record(),
        rank == 0,
        log.tensorboard_dir,
        start,
    )


def seed_everything(seed: int) -> None:
    """Python, numpy and torch's default generator alike on every rank; the TP tracker per TP rank."""
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_seed(seed, state.get_tensor_model_parallel_rank())


def resumed_schedule(job: JobConfig, resume: ckpt.ResumePoint | None) -> tuple[JobConfig, bool]:
    """The job whose lr schedule a resume follows, as Megatron decides it, and whether the restored
    scheduler must switch to the flags' schedule (``switch_schedule``).

    The checkpoint's schedule and the flags' must agree; where they differ, the run is refused
    unless ``--use-checkpoint-opt_param-scheduler`` (continue the checkpoint's) or
    ``--override-opt_param-scheduler`` (the flags' from here on) says which wins. Otherwise a
    longer ``--train-iters`` would splice two schedules, and a new ``--lr`` would be ignored.
    """
    saved = (
        resume.meta.get("lr_schedule")
        if resume and job.checkpoint.load_optim and not resume.finetune
        else None
    )
    if not saved:  # the schedule starts afresh (or an older checkpoint recorded none)
        return job, False
    now = job.schedule.record()
    diffs = schedule_differences(saved, now)
    if not diffs or job.checkpoint.schedule_from == "flags":
        return job, bool(diffs)
    if job.checkpoint.schedule_from == "checkpoint" and saved["counts"] == now["counts"]:
        logger.info(
            f"continuing {resume}'s lr schedule (--use-checkpoint-opt_param-scheduler): {'; '.join(diffs)}"
        )
        return dataclasses.replace(job, schedule=job.schedule.following(saved)), False
    raise ckpt.CheckpointError(
        f"{resume} was trained on another lr schedule: {'; '.join(diffs)}. Pass the checkpoint's values, or say "
        "which schedule wins: --use-checkpoint-opt_param-scheduler continues the checkpoint's, "
        f"--override-opt_param-scheduler follows the flags' from iteration {resume.meta['iteration']} on"
    )


def switch_schedule(engine, lr: float) -> None:
    """After a resume under --override-opt_param-scheduler: the flags' schedule, at the checkpoint's step.

    The scheduler's state holds the checkpoint's peak rate (``base_lrs``); the step about to run
    takes the new schedule's rate at the same step count.
    """
    schedule = engine.lr_scheduler
    schedule.base_lrs = [lr] * len(schedule.base_lrs)
    rates = [
        base * rate(schedule.last_epoch)
        for base, rate in zip(schedule.base_lrs, schedule.lr_lambdas)
    ]
    schedule._last_lr = rates
    for group, value in zip(engine.optimizer.param_groups, rates):
        group["lr"] = value


class Trainer:
    """glm-pretrain's run: ``__init__`` builds the components in order (tokenizer, resume point, process
    groups, data, this rank's model shard, engine, restore, loader, metrics, checkpointer, stop
    handling), ``train`` runs the loop, ``close`` releases what the set-up started.

    A subclass changes what is trained on (``build_batches``: glm-finetune's labelled examples), how
    a micro-batch becomes a loss (``objective``) and what each validation measures (``validate``).
    """

    command = "glm-pretrain"
    objective = None  # pretraining's: blank infilling's loss per objective (``StepRunner``)
    rows_per_sample = 1  # micro-batch rows each sample takes

    def __init__(self, job: JobConfig):
        self.job = job
        # --exit-duration-in-mins counts from here (set-up included)
        self.started = time.monotonic()
        self.device = job.device
        for flag, folder in (("--save", job.checkpoint.save), ("--log-dir", job.log_dir)):
            if folder:
                check_writable(flag, folder)
        self.meter = None
        if job.logging.measure_memory:
            from megatron_glm.training.memory import MemoryMeter

            self.meter = MemoryMeter(self.device)
        par = job.parallel
        self.tokenizer = GLMTokenizer(job.settings.tokenizer.resolved())
        self.tp, self.pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        self.model_cfg = job.model_config(
            self.tokenizer.padded_vocab_size(self.tp, par.make_vocab_size_divisible_by)
        )
        # a task file that cannot be read fails here, before any work
        self.tasks = build_tasks(job, self.tokenizer)
        self.resume = ckpt.find_resume(
            job.checkpoint.load,
            job.checkpoint.save,
            self.model_cfg,
            self.tokenizer.fingerprint(),
            job.checkpoint.finetune,
            self.tokenizer.vocab_size,
        )
        job, self.follow_flags_schedule = resumed_schedule(job, self.resume)
        self.job = job
        self.read_inputs()
        init_distributed(self.device, self.tp, self.pp, self.model_cfg)
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.vpp = par.virtual_stages(self.model_cfg.num_layers)
        self.grad_accum = job.global_batch_size // (
            job.training.micro_batch_size * state.get_data_parallel_world_size()
        )
        self.train_batches, self.valid_batches = self.build_batches()
        if self.resume:
            self.resume.plan(self._checkpoint_meta())

        seed_everything(job.training.seed)
        kernels.set_backend(job.settings.implementation.kernels)
        self.chunks, self.setup_peak = build_model(
            job, self.model_cfg, self.resume, self.grad_accum * self.vpp
        )
        self.module = (
            self.chunks[0] if len(self.chunks) == 1 else torch.nn.ModuleList(self.chunks)
        ).to(self.device)
        state.mark_for_gradient_norm(self.module.parameters())
        self.rank_weight_bytes = sum(numel(p) * p.element_size() for p in self.module.parameters())
        # one engine.backward per micro-batch and chunk: that is the engine's accumulation count
        self.engine = build_engine(job, self.module, self.grad_accum * len(self.chunks))
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            job.training.precision, torch.float32
        )
        self.tied = TiedEmbedding(self.chunks, self.dtype)
        self.iteration, self.consumed = self._restore() if self.resume else (0, 0)
        self.tied.broadcast_weight()
        seq_local = job.data.seq_length // self.tp if par.sequence_parallel else job.data.seq_length
        rows = job.training.micro_batch_size * self.rows_per_sample
        self.runner = StepRunner(
            self.engine,
            self.chunks,
            self.tied,
            self.vpp,
            (rows, seq_local, self.model_cfg.hidden_size),
            self.dtype,
            self.device,
            self.objective,
        )
        if self.meter:
            self.meter.mark()

        # before anything is written there
        self.save_lock = ckpt.lock_save_folder(job.checkpoint.save, self.rank)
        self.log = build_metrics(job, self.rank, self.iteration)
        self._announce()
        self.checkpointer = ckpt.Checkpointer(
            job.checkpoint.save,
            job.checkpoint.save_interval,
            job.checkpoint.keep_last,
            self._checkpoint_meta(),
            self.rank,
            self.resume,
            job.checkpoint.async_save,
        )
        self.stream = build_loader(job, self.train_batches, self.consumed, self.device)
        cfg = self.model_cfg
        self.speed = Throughput(
            job.data.seq_length * self.rows_per_sample,
            flops_per_token(cfg.num_layers, cfg.hidden_size, job.data.seq_length, cfg.vocab_size),
            job.train_iters,
            self.iteration,
            self.consumed,
        )
        minutes = job.training.exit_duration_in_mins
        self.preemption = Preemption(
            job.training.stop_file,
            self.device,
            self.rank,
            self.started + 60.0 * minutes if minutes else None,
        )

    def read_inputs(self) -> None:
        """Read and check what the run trains on that fits in memory (fine-tuning's splits), before any work;
        the corpus is opened by ``build_batches``."""

    def build_batches(self):
        """(train, validation) micro-batch datasets: the corpus, collated by the blank-infilling objective."""
        job = self.job
        train, valid = build_data(job, self.tokenizer, self.model_cfg.vocab_size)
        if valid is None and job.logging.eval_interval <= job.train_iters:
            logger.warning(
                f"--split {job.data.split} leaves no validation data, so the validation every "
                f"--eval-interval {job.logging.eval_interval} iterations measures nothing: give the split "
                "a validation share (e.g. 98,2,0)"
            )
        return train, valid

    def _restore(self) -> tuple[int, int]:
        """(iteration, consumed samples) of the resume point, its state restored into the engine."""
        job, resume = self.job, self.resume
        trust = job.checkpoint.trust_checkpoint
        reader = (
            universal.reader_for(
                resume,
                RankLayout.from_state(),
                self.model_cfg.geglu,
                trust,
                self.model_cfg.vocab_size,
            )
            if resume.reshard
            else None
        )
        position = ckpt.Checkpointer.load(
            self.engine,
            resume,
            trust,
            job.checkpoint.load_optim,
            job.checkpoint.load_rng,
            self.chunks,
            reader,
        )
        serialization.check_finite(
            ((name, getattr(p, "ds_tensor", p)) for name, p in self.module.named_parameters()),
            str(resume),
        )
        if self.follow_flags_schedule:
            switch_schedule(self.engine, job.schedule.lr)
            logger.info(
                f"following the flags' lr schedule from iteration {position[0]} "
                "(--override-opt_param-scheduler)"
            )
        return position

    # -- set-up reports ---------------------------------------------------------------------
    def _announce(self) -> None:
        job, cfg, par = self.job, self.model_cfg, self.job.parallel
        n_params = count_parameters(cfg, self.tp)
        world = state.get_data_parallel_world_size()
        resumed = (
            f"; resumed from {self.resume} at iteration {self.iteration}" if self.resume else ""
        )
        notes, resume = [], self.resume
        if resume and not resume.finetune:
            if resume.weights_only:
                notes.append("converted weights")
            if resume.reshard:
                meta = resume.meta
                saved = (
                    meta.get("tensor_model_parallel_size", 1),
                    meta.get("pipeline_model_parallel_size", 1),
                )
                stage = ckpt.settings_of(meta).parallel.zero_stage
                notes.append(
                    f"{'universal checkpoint' if resume.universal else 'resharded'} of a TP {saved[0]} "
                    f"x PP {saved[1]} x DP {meta.get('data_parallel_size', '?')} ZeRO-{stage} run"
                    + (f": {', '.join(resume.changes)}" if resume.changes else "")
                )
                if saved != (self.tp, self.pp) and job.checkpoint.load_rng:
                    notes.append(f"random state from --seed {job.training.seed} (another TP x PP)")
            if resume.weights_only or not job.checkpoint.load_optim:
                notes.append("the optimizer state and lr schedule start fresh")
            if resume.weights_only or not job.checkpoint.load_rng:
                notes.append(f"random state from --seed {job.training.seed}")
        converted = f" ({'; '.join(notes)})" if notes else ""
        if self.resume and self.resume.finetune:
            resumed = f"; fine-tuning from {self.resume}'s weights (iteration, data, optimizer and RNG start fresh)"
        ramp = (
            " (ramped up from {} by {} over {} samples)".format(*job.batches.rampup)
            if job.batches.rampup
            else ""
        )
        logger.info(
            f"{self.command}: {n_params / 1e6:.2f} M parameters (this TP rank's share), {cfg.num_layers} layers, "
            f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size} (padded), seq {job.data.seq_length}, global batch "
            f"{job.global_batch_size} = {job.training.micro_batch_size} x {self.grad_accum} accumulation x {world} "
            f"data-parallel ranks{ramp}, TP {self.tp}{' + sequence parallel' if par.sequence_parallel else ''}, "
            f"PP {self.pp}{f' x {self.vpp} virtual' if self.vpp > 1 else ''}, "
            # read back from the engine: what a --deepspeed-config made of the flags
            f"ZeRO {self.engine.zero_optimization_stage()}, clip {self.engine.gradient_clipping()}, "
            f"{'bf16' if self.engine.bfloat16_enabled() else 'fp16' if self.engine.fp16_enabled() else 'fp32'}, "
            f"device {self.device}{resumed}{converted}"
        )
        if self.setup_peak is not None:
            logger.info(
                f"model set-up (rank {self.rank}): {self.rank_weight_bytes / 2**20:,.0f} MiB of weights "
                f"built, host memory peak +{self.setup_peak / 2**20:,.0f} MiB"
            )

    def _checkpoint_meta(self) -> dict:
        job, cfg = self.job, self.model_cfg
        stages = job.stages(cfg.num_layers)
        return {
            "model": cfg.to_dict(),
            "tokenizer": self.tokenizer.describe(),
            "seq_length": job.data.seq_length,
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "data_parallel_size": state.get_data_parallel_world_size(),
            "pipeline_layers": [[[r.start, r.stop] for r in stage] for stage in stages],
            "global_batch_size": job.global_batch_size,
            "train_iters": job.train_iters,
            "lr_schedule": job.schedule.record(),
            "settings": job.settings.record(),
        }

    # -- steps ------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict:
        """One optimizer step over the next global batch; its values (losses, norm, lr, data wait, ...)."""
        batches, data_wait = [], 0.0
        # below --global-batch-size while ramping up
        batch_size = self.job.batches.size_at(self.consumed)
        for _ in range(
            batch_size
            // (self.job.training.micro_batch_size * state.get_data_parallel_world_size())
        ):
            batch, waited = self.stream.next()
            batches.append(self._to_device(batch))
            data_wait += waited
        values = self.runner.train(batches, inject_overflow=faults.overflow_at(self.iteration + 1))
        self.iteration += 1
        self.consumed += batch_size
        loss = float("nan") if faults.nan_loss_at(self.iteration) else values["lm_loss"]
        if not math.isfinite(loss) and self.job.training.precision != "fp16":
            save = self.job.checkpoint.save
            newest = ckpt.resume_tag(save) if save else None
            where = (
                f"the newest checkpoint is {save}/{newest}"
                if newest
                else f"--save {save} holds no checkpoint yet"
                if save
                else "there is no --save"
            )
            raise TrainingError(
                f"loss is {loss} at iteration {self.iteration}; stopped without saving, {where}"
                + (f" (this run started from {self.resume})" if self.resume and not newest else "")
                + ". Lower --lr, raise --clip-grad or --lr-warmup-iters, or check the data"
            )
        values.update(
            {
                "data_wait_ms": 1000.0 * data_wait,
                "lr": self.engine.get_lr()[0],
                "consumed_samples": self.consumed,
                "batch_size": batch_size,
                "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
            }
        )
        if self.job.training.precision == "fp16":
            scale = getattr(self.engine.optimizer, "cur_scale", None)
            values["loss_scale"] = float(scale) if scale is not None else None
        return values

    def evaluate(self) -> float:
        """Mean loss per token over the first ``--eval-iters`` global batches of the validation split (Megatron's
        count; the same samples every time), each data-parallel rank taking its share as in training."""
        sampler = PretrainingSampler(
            len(self.valid_batches),
            0,
            self.job.training.micro_batch_size,
            state.get_data_parallel_rank(),
            state.get_data_parallel_world_size(),
        )
        micro_batches = itertools.islice(
            iter(sampler), self.job.logging.eval_iters * self.grad_accum
        )
        return self.runner.evaluate(
            [self._to_device(collate_now(self.valid_batches, indices)) for indices in micro_batches]
        )

    def validation_due(self) -> bool:
        return self.iteration % self.job.logging.eval_interval == 0

    def validate(self) -> dict:
        """What every ``--eval-interval`` measures: the validation loss, and the ``--eval-tasks``."""
        values = {}
        if self.valid_batches is not None:
            values["valid_loss"] = self.evaluate()
            logger.info(
                f"validation at iter {self.iteration}: loss {values['valid_loss']:.4f} "
                f"(ppl {math.exp(min(values['valid_loss'], 50)):.2f})"
            )
        if self.tasks:
            values.update(self.evaluate_tasks())
        return values

    def spread_scores(self, count: int, make, rows: int, width: int, scorer=None):
        """``step.spread_scores`` of this run's model: ``make(k)``'s micro-batches moved to the device."""
        return spread_scores(
            self.runner, count, lambda k: self._to_device(make(k)), rows, width, scorer
        )

    def micro_batch_count(self, items: int, per_batch: int) -> int:
        return score_count(items, per_batch, self.pp, self.vpp)

    def evaluate_tasks(self) -> dict:
        """``--eval-tasks`` on the training model, any layout: micro-batches of rows spread over the data-parallel
        replicas (as many on each: ZeRO-3 gathers in every forward; padded with rows that score nothing), scored on
        the last stage, summed everywhere."""
        out = {}
        mb, seq = (
            self.job.training.micro_batch_size * self.rows_per_sample,
            self.job.data.seq_length,
        )
        for name, kind, rows, labels in self.tasks:

            def make(k, rows=rows):
                arrays = eval_tasks.layout(
                    rows[k * mb : (k + 1) * mb],
                    seq,
                    self.tokenizer.pad_id,
                    mb,
                    self.model_cfg.positions_1d,
                )
                return {key: torch.from_numpy(v) for key, v in arrays.items()}

            full = self.spread_scores(self.micro_batch_count(len(rows), mb), make, mb, 3)
            metrics = eval_tasks.metrics(kind, rows, full[: len(rows)].numpy(), labels)
            out.update({f"eval/{name}/{key}": value for key, value in metrics.items()})
            logger.info(
                f"{name} at iter {self.iteration}: "
                + ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in metrics.items()
                )
            )
        return out

    def _console_line(self, values: dict) -> str:
        parts = [f"iter {self.iteration}/{self.job.train_iters}", f"loss {values['lm_loss']:.4f}"]
        parts += [f"{n} {values['loss_' + n]:.3f}" for n in OBJECTIVES if "loss_" + n in values]
        parts += [
            f"lr {values['lr']:.2e}",
            f"grad {values['grad_norm']:.3f}",
            f"{values['tokens_per_s']:,.0f} tok/s",
            f"{values['tflops']:.2f} TFLOP/s",
            f"data wait {values['data_wait_ms']:.1f} ms",
        ]
        if "mfu" in values:
            parts.append(f"MFU {values['mfu']:.1%}")
        parts += [
            memory_summary(),
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(values['eta_s']))}",
        ]
        return " | ".join(parts)

    def _save(self) -> None:
        folder = self.checkpointer.save(self.engine, self.iteration, self.consumed)
        if self.checkpointer.writer is None:
            logger.info(f"saved {folder} ({self.checkpointer.blocked_s:.2f} s)")
        else:
            c = self.checkpointer
            logger.info(
                f"saving {folder} in the background (training held {c.blocked_s:.2f} s: host copy "
                f"{c.blocked_s - c.waited_s:.2f} s, waiting for the previous save {c.waited_s:.2f} s)"
            )

    def _stop(self, reason: str) -> int:
        """A stop after a step: save unless just saved; the exit status that says what happened."""
        save = self.job.checkpoint.save
        if save and not self.checkpointer.saved(self.iteration):
            self._save()
        faults.step_done(math.inf)
        self.checkpointer.wait()
        planned = reason in (DURATION, "--exit-interval")
        code = 0 if planned else EXIT_INTERRUPTED if reason == "SIGINT" else EXIT_REQUEUE
        outcome = {
            0: "exit status 0; run the same command to continue",
            EXIT_INTERRUPTED: "exit status 130 (interrupted); run the same command to resume",
            EXIT_REQUEUE: f"exit status {EXIT_REQUEUE} asks the launcher to requeue",
        }[code]
        logger.info(
            f"stopping after iteration {self.iteration} ({reason}): "
            + (
                f"saved {save}/{self.checkpointer.last_saved}; "
                if save
                else "no --save, nothing saved; "
            )
            + outcome
        )
        return code

    def train(self) -> dict:
        """The loop to ``--train-iters`` or a stop request; a summary (iterations, losses, exit status)."""
        job, history, exit_code = self.job, [], 0
        if self.iteration >= job.train_iters:
            logger.info(
                f"nothing to do: the run is at iteration {self.iteration}, --train-iters is {job.train_iters} "
                "(raise --train-iters, with --lr-decay-iters to keep the schedule, to train on)"
            )
        self.engine.train()
        while self.iteration < job.train_iters:
            values = self.train_step()
            if self.iteration % job.logging.log_interval == 0 or self.iteration == job.train_iters:
                values.update(self.speed.report(self.iteration, self.consumed))
                logger.info(self._console_line(values))
            if self.validation_due():
                values.update(self.validate())
            self.log.record(self.iteration, values)
            history.append(values["lm_loss"])
            faults.crash_point(f"iteration:{self.iteration}")
            faults.step_done(self.iteration)
            if self.checkpointer.due(self.iteration, job.train_iters):
                self._save()
            hold = faults.holds_after(self.iteration)
            reason = self.preemption.wait() if hold else self.preemption.requested()
            interval = job.training.exit_interval
            if not reason and interval and self.iteration % interval == 0:
                reason = "--exit-interval"
            if reason and self.iteration < job.train_iters:
                exit_code = self._stop(reason)
                break
        faults.step_done(math.inf)
        self.checkpointer.wait()  # the run ends once its last save is complete
        if self.meter:
            from megatron_glm.training.memory import write_report

            write_report(
                job.log_dir,
                self.rank,
                self.meter.finish(),
                {
                    "tp_rank": state.get_tensor_model_parallel_rank(),
                    "pp_rank": state.get_pipeline_model_parallel_rank(),
                    "dp_rank": state.get_data_parallel_rank(),
                    "setup_host_peak_bytes": self.setup_peak,
                    "rank_weight_bytes": self.rank_weight_bytes,
                },
            )
        whole = self.chunks[0] if len(self.chunks) == 1 and self.pp == 1 else None
        return {
            "iteration": self.iteration,
            "losses": history,
            "model": whole,
            "tokenizer": self.tokenizer,
            "exit_code": exit_code,
        }

    def close(self) -> None:
        """Let a save in flight finish, stop the loader's workers, restore the signal handlers, close the logs."""
        try:
            self.checkpointer.wait()
        except (
            ckpt.CheckpointError
        ) as e:  # the run is already ending on another error: report this one too
            logger.error(str(e))
        self.stream.close()
        self.preemption.close()
        self.log.close()
        if self.save_lock:
            self.save_lock.release()
