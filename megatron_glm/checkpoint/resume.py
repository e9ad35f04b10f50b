"""Where a run resumes from, and whether it can: the checkpoint's architecture, tokenizer and layout."""

from __future__ import annotations

import logging
import os

from megatron_glm.checkpoint.format import (
    TO_UNIVERSAL,
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
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    vocab_in_use: int | None = None,
) -> None:
    """Refuse a checkpoint of another architecture, tokenizer or layout, naming every difference.

    A universal checkpoint takes another vocabulary padding (the padding follows TP) when the
    tokenizer's ``vocab_in_use`` rows fit both: its reader drops padding rows or adds zero ones.

    A universal checkpoint takes any layout; the others the TP x PP they were saved with.
    """
    for flag, saved, now in (
        (
            "--tensor-model-parallel-size",
            meta.get("tensor_model_parallel_size", 1),
            tensor_parallel,
        ),
        (
            "--pipeline-model-parallel-size",
            meta.get("pipeline_model_parallel_size", 1),
            pipeline_parallel,
        ),
    ):
        if saved != now and not meta.get("universal") and not meta.get("weights_only"):
            raise CheckpointError(
                f"{where} was saved with {flag} {saved}, this run has {now}: resume with the same "
                "layout, or keep the whole training state on the new one with "
                + TO_UNIVERSAL.format(where=where)
            )
    saved = ModelConfig.from_dict(meta["model"])
    diffs = saved.architecture_differences(model_cfg)
    repadded = (
        meta.get("universal")
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


def check_data_parallel(resume: ResumePoint, data_parallel: int, zero_stage: int) -> None:
    """DeepSpeed's ZeRO partitions load only on the data-parallel size and stage that wrote them."""
    meta = resume.meta
    saved_stage, saved_dp = settings_of(meta).parallel.zero_stage, meta.get("data_parallel_size")
    if resume.universal or resume.weights_only or resume.finetune or saved_dp is None:
        return
    if (saved_stage or zero_stage) and (saved_stage, saved_dp) != (zero_stage, data_parallel):
        raise CheckpointError(
            f"{resume} holds ZeRO-{saved_stage} partitions of {saved_dp} data-parallel ranks; this "
            f"run has ZeRO-{zero_stage} on {data_parallel}: resume with the same, or keep the whole "
            "training state on the new layout with " + TO_UNIVERSAL.format(where=resume.load_dir)
        )


class ResumePoint:
    """The complete checkpoint a run starts from: its folder, tag and meta."""

    def __init__(self, load_dir: str, tag: str, meta: dict, finetune: bool = False):
        self.load_dir, self.tag, self.meta, self.finetune = load_dir, tag, meta, finetune

    @property
    def weights_only(self) -> bool:
        """A glm-convert output: weights for each rank, no optimizer state."""
        return bool(self.meta.get("weights_only"))

    @property
    def universal(self) -> bool:
        """A glm-convert to-universal output: the whole training state, for any layout."""
        return bool(self.meta.get("universal"))

    def __str__(self) -> str:
        return os.path.join(self.load_dir, self.tag)


def find_resume(
    load: str | None,
    save: str | None,
    model_cfg: ModelConfig,
    tokenizer_fingerprint: str | None,
    tp: int,
    pp: int,
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
    check_compatible(meta, model_cfg, tokenizer_fingerprint, load, tp, pp, vocab_in_use)
    return ResumePoint(load, tag, meta, finetune)
