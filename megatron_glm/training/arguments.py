"""glm-pretrain's command line, made from the settings dataclasses (``megatron_glm/settings.py``).

Flag names and meanings are Megatron-LM's (THUDM/GLM's for the objective); each flag's default,
type and help live on its field, so they are written once.
"""

from __future__ import annotations

import argparse

from megatron_glm.config import add_model_flags
from megatron_glm.flags import add_flags
from megatron_glm.settings import (
    BlankInfillingConfig,
    CheckpointConfig,
    DataConfig,
    ImplementationConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    TokenizerSpec,
    TrainingConfig,
)
from megatron_glm.training.dry_run import DryRunConfig

GROUPS = (  # --help's groups, and the sections whose flags each lists
    ("model", (ImplementationConfig,)),
    ("parallelism", (ParallelConfig,)),
    (
        "blank infilling (the GLM objective; THUDM/GLM's flags and defaults)",
        (BlankInfillingConfig,),
    ),
    ("data", (DataConfig,)),
    ("tokenizer", (TokenizerSpec,)),
    ("training", (TrainingConfig, OptimizerConfig)),
    ("checkpoints and logging", (CheckpointConfig, LoggingConfig)),
    ("dry run (one CPU process checks the whole job on fake tensors)", (DryRunConfig,)),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="glm-pretrain",
        description="Pretrain GLM with autoregressive blank infilling.",
    )
    for title, sections in GROUPS:
        group = p.add_argument_group(title)
        if title == "model":
            add_model_flags(group)
        for section in sections:
            add_flags(group, section)
    return p
