"""Where a run resumes from, and whether it can: the checkpoint's architecture, tokenizer and layout."""

from __future__ import annotations

import logging
import os

from megatron_glm.checkpoint.format import (
    CheckpointError,
    locate,
    read_meta,
    resume_tag,
    settings_of,
)
from megatron_glm.config import ModelConfig

logger = logging.getLogger(__name__)


def check_compatible(
    meta: dict,
    model_cfg: ModelConfig,
    tokenizer_fingerprint: str | None,
    where: str,
    vocab_in_use: int | None = None,
) -> None:
    """Refuse a checkpoint of another architecture or tokenizer, naming every difference.

    The layout may differ (``layout_changes``). So may the vocabulary padding, which follows TP,
    when the tokenizer's ``vocab_in_use`` rows fit both: the reader drops padding rows or adds zero
    ones. A weights-only checkpoint is read file by file, so its padding must be this run's.
    """
    saved = ModelConfig.from_dict(meta["model"])
    diffs = saved.architecture_differences(model_cfg)
    repadded = (
        not meta.get("weights_only")
        and diffs == [f"vocab_size: {saved.vocab_size} vs {model_cfg.vocab_size}"]
        and vocab_in_use is not None
        and vocab_in_use <= min(saved.vocab_size, model_cfg.vocab_size)
    )
    if repadded:
        change = (
            f"its {saved.vocab_size - model_cfg.vocab_size} last padding rows are dropped"
            if saved.vocab_size > model_cfg.vocab_size
            else f"{model_cfg.vocab_size - saved.vocab_size} zero rows are added"
        )
        logger.warning(
            f"{where} pads the vocabulary to {saved.vocab_size} rows, this layout to {model_cfg.vocab_size} "
            f"(--make-vocab-size-divisible-by x TP): {change}, in the weights and the Adam moments; the "
            f"tokenizer's {vocab_in_use} rows move unchanged"
        )
        diffs = []
    if diffs:
        padding = saved.vocab_size != model_cfg.vocab_size and len(diffs) == 1
        raise CheckpointError(
            f"{where} holds another architecture (checkpoint vs flags): {'; '.join(diffs)}. "
            + (
                f"The vocabulary is padded to a multiple of --make-vocab-size-divisible-by x TP: choose them so that "
                f"it stays {saved.vocab_size} rows"
                if padding
                else "Pass the flags it was trained with, or start a new --save folder"
            )
        )
    recorded = meta.get("tokenizer", {}).get("fingerprint")
    if tokenizer_fingerprint and recorded and recorded != tokenizer_fingerprint:
        raise CheckpointError(
            f"{where} was trained with another tokenizer ({meta['tokenizer'].get('files')}); "
            "pass the same tokenizer files"
        )


def layout_changes(meta: dict, run: dict) -> list[str]:
    """How this run (``run``: the meta.json it would write) lays out the training state otherwise than
    the checkpoint did: what DeepSpeed's own loading cannot take, so that each rank reads its part of
    every parameter instead (``universal.py``)."""
    saved, now = settings_of(meta), settings_of(run)
    pp = meta.get("pipeline_model_parallel_size", 1), run["pipeline_model_parallel_size"]
    changes = [
        f"{what} {before} -> {after}"
        for what, before, after in (
            (
                "TP",
                meta.get("tensor_model_parallel_size", 1),
                run["tensor_model_parallel_size"],
            ),
            ("PP", *pp),
            # a new PP splits the layers anew: only a new split on the same PP is news
            (
                "layers per stage",
                meta.get("pipeline_layers") if pp[0] == pp[1] else None,
                run["pipeline_layers"] if pp[0] == pp[1] else None,
            ),
            ("ZeRO stage", saved.parallel.zero_stage, now.parallel.zero_stage),
            ("precision", saved.training.precision, now.training.precision),
            ("padded vocabulary", meta["model"]["vocab_size"], run["model"]["vocab_size"]),
        )
        if before != after
    ]
    # ZeRO partitions its state over the data-parallel ranks; without it every rank holds it all
    if saved.parallel.zero_stage and meta.get("data_parallel_size") != run["data_parallel_size"]:
        changes.append(f"DP {meta.get('data_parallel_size')} -> {run['data_parallel_size']}")
    return changes


class ResumePoint:
    """The complete checkpoint a run starts from: its folder, tag and meta."""

    def __init__(self, load_dir: str, tag: str, meta: dict, finetune: bool = False):
        self.load_dir, self.tag, self.meta, self.finetune = load_dir, tag, meta, finetune
        self.changes: list[str] = []  # layout_changes, once the run's layout is known

    def plan(self, run_meta: dict) -> None:
        """Compare the checkpoint's layout with this run's (``run_meta``: the meta.json it would write)."""
        if not self.weights_only:
            self.changes = layout_changes(self.meta, run_meta)

    @property
    def weights_only(self) -> bool:
        """A glm-convert output: weights for each rank, no optimizer state."""
        return bool(self.meta.get("weights_only"))

    @property
    def universal(self) -> bool:
        """A glm-convert to-universal output: the whole training state, for any layout."""
        return bool(self.meta.get("universal"))

    @property
    def reshard(self) -> bool:
        """Each rank reads its part of every parameter's training state: a universal checkpoint, or one
        saved on another layout. Otherwise DeepSpeed loads its own files, RNG states included."""
        return self.universal or bool(self.changes)

    def __str__(self) -> str:
        return os.path.join(self.load_dir, self.tag)


def find_resume(
    load: str | None,
    save: str | None,
    model_cfg: ModelConfig,
    tokenizer_fingerprint: str | None,
    finetune: bool = False,
    vocab_in_use: int | None = None,
) -> ResumePoint | None:
    """Where to resume: ``--load``'s checkpoint, or ``--save``'s when a restarted (requeued) job finds one there.

    A fine-tuning job starts from ``--load``'s weights, unless ``--save`` already holds its own
    checkpoint: then it was restarted, and resumes that. A ``--load`` that holds no checkpoint is
    refused, unless it is ``--save`` itself (the launchers' auto-resume: a first run finds nothing).
    An incompatible checkpoint is refused here, before any work and before anything is written.
    """
    saved = resume_tag(save) if save else None
    if saved and (not load or finetune):
        load, tag, finetune = save, saved, False
    elif load and save and os.path.abspath(load) == os.path.abspath(save):
        tag = resume_tag(load)
    elif load:
        load, tag = locate(load)
    else:
        tag = None
    if tag is None:
        if save:
            logger.info(
                "no checkpoint in %s yet: starting from iteration 0 with freshly initialised weights",
                save,
            )
        return None
    meta = read_meta(load, tag)
    check_compatible(meta, model_cfg, tokenizer_fingerprint, load, vocab_in_use)
    return ResumePoint(load, tag, meta, finetune)
