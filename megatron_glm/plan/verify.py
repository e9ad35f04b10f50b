"""glm-plan --verify K: each of the best K layouts dry-run (``glm-pretrain --dry-run``), traced beside estimated.

glm-plan ranks layouts by formulas (``plan/memory.py``); the dry run builds the ranks of a layout on fake
tensors and traces one step. A layout the dry run finds too big for the GPUs is not recommended,
whatever the estimate said.
"""

from __future__ import annotations

import dataclasses
import logging

from megatron_glm.config import ModelConfig
from megatron_glm.plan.memory import Workload
from megatron_glm.plan.search import Candidate, Cluster, GiB, flags

logger = logging.getLogger(__name__)


def model_flags(cfg: ModelConfig) -> list[str]:
    """glm-pretrain's flags for exactly this architecture."""
    out = [
        "--num-layers",
        str(cfg.num_layers),
        "--hidden-size",
        str(cfg.hidden_size),
        "--num-attention-heads",
        str(cfg.num_attention_heads),
        "--ffn-hidden-size",
        str(cfg.ffn_hidden_size),
        "--max-position-embeddings",
        str(cfg.max_position_embeddings),
        "--position-embedding-type",
        cfg.position_embedding_type,
        "--hidden-dropout",
        str(cfg.hidden_dropout),
        "--attention-dropout",
        str(cfg.attention_dropout),
        "--embedding-gradient-shrink-alpha",
        str(cfg.embedding_gradient_shrink_alpha),
    ]
    return out + ["--geglu"] * cfg.geglu + ["--deepnorm"] * cfg.deepnorm


def dry_run_argv(w: Workload, candidate: Candidate, cluster: Cluster) -> list[str]:
    """glm-pretrain --dry-run's command line for one layout: no data, the vocabulary by size."""
    return [
        "--data-path",
        "(none: a dry run reads no data)",
        "--vocab-size",
        str(w.cfg.vocab_size),
        "--train-iters",
        "1",
        "--lr",
        "1e-4",
        *model_flags(w.cfg),
        *flags(w, candidate.layout),
        "--dry-run",
        "--world-size",
        str(cluster.world),
        "--dry-run-device",
        w.device,
    ]


@dataclasses.dataclass
class Verified:
    candidate: Candidate
    traced_peak: int  # the largest peak among the impersonated ranks
    stage: int  # the pipeline stage of that rank
    fits: bool


def verify(w: Workload, cluster: Cluster, ranked: list[Candidate], k: int) -> list[Verified]:
    """Dry-run the ``k`` best layouts that fit by the estimate."""
    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.dry_run import execute

    budget = (cluster.gpu_memory_gib - cluster.reserve_gib) * GiB
    out = []
    for candidate in [c for c in ranked if c.fits][:k]:
        argv = dry_run_argv(w, candidate, cluster)
        logger.info("glm-plan --verify: glm-pretrain " + " ".join(argv))
        reports = execute(build_parser().parse_args(argv), quiet=True)["dry_run"]
        worst = max(reports, key=lambda r: r["peak"])
        out.append(Verified(candidate, worst["peak"], worst["pp_rank"], worst["peak"] <= budget))
    return out


def table(verified: list[Verified]) -> str:
    head = f"{'layout':<44} {'estimate GiB':>12} {'dry run GiB':>11} {'stage':>5} {'diff':>6}  fits"
    rows = [head, "-" * len(head)]
    for v in verified:
        c = v.candidate
        rows.append(
            f"{c.layout.label:<44} {c.peak / GiB:>12.2f} {v.traced_peak / GiB:>11.2f} "
            f"{v.stage:>5} {v.traced_peak / c.peak - 1:>+6.1%}  {'yes' if v.fits else 'NO'}"
        )
    return "\n".join(rows)
