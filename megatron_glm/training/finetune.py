"""glm-finetune: GLM's downstream recipe on the pretraining stack (the same Trainer, layouts and checkpoints).

  glm-finetune --task classification --train-data train.jsonl --valid-data dev.jsonl \\
      --test-data test.jsonl --load PRETRAINED --finetune --save out --epochs 3 ...

Classification is a cloze question scored by each candidate's log-likelihood in the blank
(``model/cloze.py``), seq2seq blank filling after ``[gMASK]`` (``data/finetune_data.py``). The
model, layout, precision and optimizer flags are glm-pretrain's; a run starts from any checkpoint
glm-pretrain reads (its own, ``glm-convert import-thudm`` / ``import-hf``) with a fresh optimizer
at iteration 0 (``--finetune``), and a restarted job resumes its own ``--save``. The dev split is
scored every ``--eval-interval``; the best by ``--best-metric`` is kept in ``{save}/best``; at the
end the test split is scored on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import logging
import math
import os
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from megatron_glm import logs
from megatron_glm.checkpoint import load_checkpoint, resume_tag, save_checkpoint
from megatron_glm.config import add_model_flags
from megatron_glm.data import finetune_data, finetune_metrics
from megatron_glm.data.eval_tasks import TaskError
from megatron_glm.data.finetune_data import TASKS, EpochSamples, Layout, TrainBatches
from megatron_glm.data.loader import MicroBatches
from megatron_glm.flags import add_flags, read_flags, setting
from megatron_glm.model.cloze import LOSSES, SCORES, ClassificationLoss, Seq2SeqLoss
from megatron_glm.parallel import state
from megatron_glm.parallel.state import discover_launch, exit_without_teardown
from megatron_glm.settings import (
    CheckpointConfig,
    DataConfig,
    ImplementationConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    TokenizerSpec,
    TrainingConfig,
)
from megatron_glm.training.config import JobConfig, from_args
from megatron_glm.training.launcher_watch import watch_launcher
from megatron_glm.training.pretrain import run_command
from megatron_glm.training.trainer import Trainer

logger = logging.getLogger("megatron_glm.training.finetune")  # also when run as -m (__main__)

BEST = "best"  # {save}/best: the best dev checkpoint, a checkpoint folder of its own
RESULTS = "finetune_results.json"


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """The task, its splits, and how it is scored, trained and decoded."""

    task: str = setting(None, "the kind of task", choices=TASKS, required=True)
    train_data: str = setting(None, "the training split, JSONL", required=True)
    valid_data: str | None = setting(
        None, "the dev split, scored every --eval-interval; the best checkpoint follows it"
    )
    test_data: str | None = setting(None, "the test split, scored once at the end on the best")
    epochs: int | None = setting(
        None, "passes over the training split (instead of --train-iters): the steps follow"
    )
    pattern: str | None = setting(
        None,
        'classification from sentence rows: a cloze made of their fields, e.g. "{sentence1} ? [MASK] , '
        "{sentence2}\"; each label's word is its --verbalizer",
    )
    verbalizer: tuple[str, ...] = setting(
        (), "with --pattern: the word (or words) filling the blank for each label, in label order"
    )
    loss_func: str = setting(
        "cross_entropy",
        "classification: softmax over the candidates' scores (cross_entropy), THUDM's hinge, generative (the "
        "label's LM loss) or mix (both)",
        choices=LOSSES,
    )
    candidate_score: str = setting(
        "summed",
        "a multi-token candidate's score: its tokens' log-likelihoods summed, or their mean",
        choices=SCORES,
    )
    fast_path: bool = setting(
        True,
        "score single-token verbalizers with one row per example (their logits at [sop]), not one row per "
        "candidate",
        name="--no-single-token-fast-path",
        negate=True,
    )
    best_metric: str | None = setting(
        None,
        "the dev metric that picks the best checkpoint (default: accuracy; seq2seq: loss). Seq2seq's decoded "
        "metrics (token_f1, rouge1, rouge2, rougeL) need --decode",
        choices=tuple(finetune_metrics.HIGHER_IS_BETTER),
    )
    decode: str = setting(
        "none",
        "seq2seq: decode the dev and test splits with glm-generate's search for exact match, token F1 and "
        "ROUGE (TP 1 and PP 1, ZeRO below 3); without it, the teacher-forced metrics alone",
        choices=("none", "greedy", "beam"),
    )
    num_beams: int = setting(4, "beams of --decode beam")
    max_new_tokens: int = setting(64, "the longest decoded target")

    @property
    def metric(self) -> str:
        return self.best_metric or ("accuracy" if self.task == "classification" else "loss")

    def problems(self, parallel: ParallelConfig) -> list[str]:
        found = []
        if bool(self.pattern) != bool(self.verbalizer):
            found.append(
                "--pattern and --verbalizer go together: the pattern makes the cloze, a verbalizer per label "
                "fills it"
            )
        if self.pattern and self.task != "classification":
            found.append("--pattern and --verbalizer are for --task classification")
        if self.verbalizer and len(set(self.verbalizer)) != len(self.verbalizer):
            found.append(
                f"--verbalizer {' '.join(self.verbalizer)} repeats a word: each label needs its own"
            )
        if self.epochs is not None and self.epochs < 1:
            found.append("--epochs must be positive")
        decoded = {"token_f1", "rouge1", "rouge2", "rougeL"}
        allowed = set(finetune_metrics.DEV_METRICS[self.task]) | (
            decoded if self.task == "seq2seq" and self.decode != "none" else set()
        )
        if self.metric not in allowed:
            found.append(
                f"--best-metric {self.metric} is not a dev metric of --task {self.task}"
                + (" without --decode" if self.metric in decoded else "")
                + f": one of {', '.join(sorted(allowed))}"
            )
        if self.decode != "none":
            if self.task != "seq2seq":
                found.append("--decode is for --task seq2seq")
            elif (
                parallel.tensor_model_parallel_size > 1
                or parallel.pipeline_model_parallel_size > 1
                or parallel.zero_stage == 3
            ):
                found.append(
                    "--decode runs glm-generate's search on each data-parallel rank's whole model: it needs TP 1, "
                    "PP 1 and ZeRO below 3; leave it out for the teacher-forced metrics on this layout"
                )
        if self.num_beams < 1 or self.max_new_tokens < 1:
            found.append("--num-beams and --max-new-tokens must be positive")
        return found


class Finetuner(Trainer):
    """The Trainer on a labelled task: its examples instead of the corpus, the task's loss, dev and test
    scoring, and the best checkpoint."""

    command = "glm-finetune"

    def __init__(self, job: JobConfig, ft: FinetuneConfig):
        self.ft = ft
        # {"metric", "value", "iteration"} of the best dev score so far
        self.best: dict | None = None
        self.zero_shot: dict | None = None  # the dev metrics of the model fine-tuning starts from
        super().__init__(job)
        if self.resume is not None and not self.resume.finetune:  # this run's own checkpoint
            self.best = self.resume.meta.get("finetune_best")
            self.zero_shot = self.resume.meta.get("finetune_zero_shot")
        self.checkpointer.meta.update(finetune_best=self.best, finetune_zero_shot=self.zero_shot)

    # -- data -------------------------------------------------------------------------------
    def _split(self, path: str | None) -> finetune_data.Examples | None:
        if path is None:
            return None
        ft = self.ft
        return finetune_data.read_split(
            ft.task, path, self.tokenizer, self.job.data.seq_length, ft.pattern, ft.verbalizer
        )

    def read_inputs(self) -> None:
        """Every split read and checked (a bad row fails here, before a process group or a file exists)."""
        ft = self.ft
        self.train_split = self._split(ft.train_data)
        self.dev, self.test = self._split(ft.valid_data), self._split(ft.test_data)

    def build_batches(self):
        """Each split's layout, and training's samples: examples in a fresh order each epoch."""
        ft, job = self.ft, self.job
        splits = [s for s in (self.train_split, self.dev, self.test) if s is not None]
        if self.ft.task == "classification":
            # one layout, so that the rows a micro-batch carries (the pipeline's shape) never change
            most = max(s.candidates for s in splits)
            for split in splits:
                split.candidates = most
            fast = ft.fast_path and all(s.single_token for s in splits)
            self.objective = ClassificationLoss(ft.loss_func, ft.candidate_score == "per_token")
        else:
            fast = False
            self.objective = Seq2SeqLoss()
        self.fast = fast
        self.layouts = {
            name: Layout(
                split,
                job.data.seq_length,
                self.tokenizer.pad_id,
                self.model_cfg.positions_1d,
                fast,
            )
            for name, split in (("train", self.train_split), ("dev", self.dev), ("test", self.test))
            if split is not None
        }
        self.rows_per_sample = self.layouts["train"].rows_per_example
        samples = EpochSamples(
            len(self.train_split), job.batches.consumed_before(job.train_iters), job.training.seed
        )
        batches = MicroBatches(
            samples,
            TrainBatches(self.layouts["train"], job.training.micro_batch_size),
            self.model_cfg.vocab_size,
        )
        self._describe_data()
        return batches, None

    def _describe_data(self) -> None:
        ft, train = self.ft, self.train_split
        sizes = ", ".join(
            f"{name} {len(split)}"
            for name, split in (("train", train), ("dev", self.dev), ("test", self.test))
            if split is not None
        )
        if ft.task == "classification":
            how = (
                "one row per example (single-token verbalizers, logits at [sop])"
                if self.fast
                else f"{train.candidates} rows per example (a candidate each)"
            )
            logger.info(
                f"classification: {sizes} examples; {how}; loss {ft.loss_func} over {ft.candidate_score} "
                f"candidate scores; best by dev {ft.metric}"
            )
        else:
            logger.info(
                f"seq2seq: {sizes} examples; loss on the target tokens; best by dev {ft.metric}"
                + (f"; decoding {ft.decode}" if ft.decode != "none" else "")
            )
        epochs = self.job.global_batch_size * self.job.train_iters / len(train)
        logger.info(
            f"{self.job.train_iters} steps of {self.job.global_batch_size}: {epochs:.2f} epochs"
        )

    # -- scoring ----------------------------------------------------------------------------
    def score_split(self, name: str) -> dict:
        """A split's metrics on the training model, any layout (``Trainer.spread_scores``)."""
        split, layout = {"dev": self.dev, "test": self.test}[name], self.layouts[name]
        mb = self.job.training.micro_batch_size
        count = self.micro_batch_count(len(split), mb)
        n = len(split)

        def make(k):
            return layout(list(range(k * mb, min((k + 1) * mb, n))), mb)

        if split.task == "classification":
            width = split.candidates
            full = self.spread_scores(count, make, mb, width, self.objective.score)
            metrics = finetune_metrics.classification(full[:n].numpy(), split.labels)
        else:
            full = self.spread_scores(count, make, mb, 3, self.objective.score)
            metrics = finetune_metrics.seq2seq_teacher_forced(full[:n].numpy())
            if self.ft.decode != "none":
                metrics.update(
                    {
                        f"decoded_{k}" if k == "exact_match" else k: v
                        for k, v in self.decoded(split).items()
                    }
                )
        return metrics

    def decoded(self, split: finetune_data.Examples) -> dict:
        """Decoded-text metrics: each data-parallel rank decodes its share with glm-generate's search."""
        from megatron_glm.model.generation import GenerationConfig, fill_blanks

        ft = self.ft
        cfg = GenerationConfig(
            strategy=ft.decode, num_beams=ft.num_beams, max_new_tokens=ft.max_new_tokens
        )
        model = self.chunks[0]
        dp, rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
        mine = {
            e: fill_blanks(
                model, self.tokenizer, self.tokenizer.decode(split.of(e)[0].part_a), cfg
            )[1][0]
            for e in range(rank, len(split), dp)
        }
        model.train()
        if dp > 1:
            gathered = [None] * dp
            dist.all_gather_object(gathered, mine, group=state.get_data_parallel_group())
            mine = {k: v for part in gathered for k, v in part.items()}
        predictions = [mine[e] for e in range(len(split))]
        return finetune_metrics.seq2seq_decoded(predictions, split.targets)

    def _report(self, name: str, metrics: dict) -> dict:
        logger.info(
            f"{name} at iter {self.iteration}: "
            + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
            )
        )
        return {f"{name}/{k}": v for k, v in metrics.items()}

    def validate(self) -> dict:
        """The zero-shot --eval-tasks, and the dev split; a better dev score saves ``{save}/best``."""
        values = super().validate()
        if self.dev is None:
            return values
        metrics = self.score_split("dev")
        values.update(self._report("dev", metrics))
        metric = self.ft.metric
        value = metrics[metric if metric in metrics else f"decoded_{metric}"]
        if finetune_metrics.better(metric, value, self.best and self.best["value"]):
            self.best = {"metric": metric, "value": value, "iteration": self.iteration}
            self.checkpointer.meta["finetune_best"] = self.best
            if self.job.checkpoint.save:
                self.checkpointer.wait()  # one save at a time
                save_checkpoint(
                    self.engine,
                    os.path.join(self.job.checkpoint.save, BEST),
                    self.iteration,
                    {**self.checkpointer.meta, "consumed_samples": self.consumed},
                    1,
                    self.rank,
                )
            logger.info(f"best dev {metric} so far: {value:.4f} at iter {self.iteration}")
        return values

    # -- the end ----------------------------------------------------------------------------
    def _load_best(self) -> int:
        """The best checkpoint's weights into the model; its iteration (this one's when the model is the best, or
        when no best was saved: no dev split, or no --save)."""
        save = self.job.checkpoint.save
        folder = os.path.join(save, BEST) if save else None
        tag = resume_tag(folder) if folder and os.path.isdir(folder) else None
        if tag is None or (self.best and self.best["iteration"] == self.iteration):
            return self.iteration
        meta = load_checkpoint(
            self.engine, folder, tag, self.job.checkpoint.trust_checkpoint, False, False
        )
        self.tied.broadcast_weight()
        return int(meta["iteration"])

    def train(self) -> dict:
        # the baseline: the starting model, before any step
        if self.iteration == 0 and self.dev is not None:
            self.zero_shot = self.score_split("dev")
            self.checkpointer.meta["finetune_zero_shot"] = self.zero_shot
            self.log.record(0, self._report("dev", self.zero_shot))
        result = super().train()
        if result["exit_code"] != 0 or self.iteration < self.job.train_iters:
            return result
        results = {
            "best": self.best,
            "zero_shot_dev": self.zero_shot,
            "train_iters": self.job.train_iters,
        }
        if self.test is not None or self.dev is not None:
            at = self._load_best()
            results["scored_at"] = at
            values = {}
            for name in ("dev", "test"):
                if getattr(self, name) is not None:
                    metrics = self.score_split(name)
                    results[name] = metrics
                    values.update(self._report(f"final_{name}", metrics))
            values["final/scored_at_iteration"] = at
            self.log.record(self.iteration, values)
            best = self.best is not None and self.best["iteration"] == at
            logger.info(
                f"glm-finetune: final scores of iteration {at} ("
                + (
                    "the best dev checkpoint)"
                    if best
                    else "the last step: no dev split or no --save)"
                )
            )
        if self.rank == 0 and self.job.log_dir:
            with open(os.path.join(self.job.log_dir, RESULTS), "w") as f:
                json.dump(results, f, indent=1)
        result["results"] = results
        return result

    def validation_due(self) -> bool:
        return super().validation_due() or self.iteration == self.job.train_iters

    def _checkpoint_meta(self) -> dict:
        return {**super()._checkpoint_meta(), "finetune": dataclasses.asdict(self.ft)}


# -- the command ----------------------------------------------------------------------------
GROUPS = (
    ("fine-tuning", (FinetuneConfig,), ()),
    ("model", (ImplementationConfig,), ()),
    ("parallelism", (ParallelConfig,), ()),
    ("data", (DataConfig,), ("data_path", "split", "data_cache_path")),
    ("tokenizer", (TokenizerSpec,), ()),
    ("training", (TrainingConfig, OptimizerConfig), ()),
    ("checkpoints and logging", (CheckpointConfig, LoggingConfig), ()),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="glm-finetune",
        description="Fine-tune GLM on a labelled task as blank filling: cloze classification or seq2seq.",
    )
    for title, sections, exclude in GROUPS:
        group = p.add_argument_group(title)
        if title == "model":
            add_model_flags(group)
        for section in sections:
            add_flags(group, section, exclude)
    return p


def count_examples(path: str) -> int:
    """Non-empty lines of a JSONL split: its examples (each is checked when the split is read)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError as e:
        raise TaskError(f"--train-data {path}: cannot read it ({e.strerror})") from None


def job_from_args(args: argparse.Namespace, world_size: int) -> tuple[JobConfig, FinetuneConfig]:
    """The fine-tuning config and the job, or ``ValueError`` naming every flag that cannot work."""
    ft = read_flags(FinetuneConfig, args)
    problems = ft.problems(read_flags(ParallelConfig, args))
    if ft.epochs is not None:
        if args.train_iters is not None or args.train_samples is not None:
            problems.append(
                "--epochs and --train-iters/--train-samples exclude each other: pass one"
            )
        elif not problems:
            dp = ParallelConfig(
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            ).data_parallel_size(world_size)
            batch = args.global_batch_size or args.micro_batch_size * max(dp, 1)
            args = argparse.Namespace(
                **{
                    **vars(args),
                    "train_iters": max(
                        1, math.ceil(ft.epochs * count_examples(ft.train_data) / batch)
                    ),
                }
            )
    elif args.train_iters is None and args.train_samples is None:
        problems.append("pass --epochs, or --train-iters (steps) or --train-samples (examples)")
    try:
        job = from_args(args, world_size)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))
    return job, ft


def finetune(argv=None) -> dict:
    """Run glm-finetune; returns a summary (iterations, losses, results, exit status)."""
    args = build_parser().parse_args(argv)
    launch = discover_launch()
    logs.setup(launch.rank, args.log_all_ranks)
    watch_launcher(launch.source)
    job, ft = job_from_args(args, launch.world_size)
    trainer = Finetuner(job, ft)
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv=None) -> int:
    return run_command("glm-finetune", finetune, argv)


@record  # under torchrun, an uncaught exception goes to its error file (glm-torchrun reports it)
def cli() -> None:
    """The ``glm-finetune`` command (see ``pretrain.cli`` for why it leaves without the interpreter's teardown)."""
    faulthandler.enable()  # as glm-pretrain's: a rank that dies on a signal prints every thread's stack
    exit_without_teardown(main())


if __name__ == "__main__":
    cli()
