"""Training metrics: metrics.jsonl, TensorBoard and wandb; FLOPs and MFU.

``metrics.jsonl`` gets every iteration's exact loss (tests compare resumed and uninterrupted
runs with it), each iteration once: a resumed run redoes the iterations after its checkpoint,
so their earlier rows move to ``metrics.replayed.jsonl`` when it starts. The console line every
``--log-interval`` iterations is a log record (``megatron_glm/logs.py``).
"""

from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger(__name__)
METRICS, REPLAYED = "metrics.jsonl", "metrics.replayed.jsonl"

# dense bf16 peak FLOP/s by device name fragment (the vendors' data sheets)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(num_layers: int, hidden: int, seq_length: int, vocab: int) -> float:
    """Megatron's training FLOPs per token without recomputation: 72Lh^2 + 12Lhs + 6Vh."""
    return 72 * num_layers * hidden**2 + 12 * num_layers * hidden * seq_length + 6 * vocab * hidden


def device_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def memory_summary() -> str:
    import torch

    if torch.cuda.is_available():
        return f"mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    try:
        import resource

        return f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    except ImportError:  # pragma: no cover - not on Linux
        return ""


# Megatron's TensorBoard tags (and their "... vs samples" twins), so that its dashboards read our runs
MEGATRON_TAGS = {
    "lm_loss": "lm loss",
    "valid_loss": "lm loss validation",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "batch_size": "batch-size",
    "loss_scale": "loss-scale",
    "iteration_time": "iteration-time",
}


def set_aside_replayed(log_dir: str, after: int) -> int:
    """Move the rows of iterations after ``after`` (which this run redoes) from metrics.jsonl to the end of
    metrics.replayed.jsonl, and a line torn by a kill with them; how many moved. Nothing is deleted."""
    path = os.path.join(log_dir, METRICS)
    if not os.path.exists(path):
        return 0
    kept, moved = [], []
    with open(path) as f:
        for line in f:
            try:
                done = json.loads(line)["iteration"] <= after
            except (ValueError, KeyError, TypeError):  # a torn last line
                done = False
            (kept if done else moved).append(line if line.endswith("\n") else line + "\n")
    if moved:
        with open(os.path.join(log_dir, REPLAYED), "a") as f:
            f.writelines(moved)
            f.flush()
            os.fsync(f.fileno())
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        logger.info(
            f"{path}: {len(moved)} rows past iteration {after}, which this run redoes, moved to {REPLAYED}"
        )
    return len(moved)


class MetricsLogger:
    """metrics.jsonl, TensorBoard and wandb on the rank that logs; ``start``: the iteration the run starts
    from (a resume redoes what was logged after it)."""

    def __init__(
        self,
        log_dir: str | None,
        tensorboard: bool,
        wandb_project: str | None,
        config: dict,
        enabled: bool,
        tensorboard_dir: str | None = None,
        start: int = 0,
    ):
        self.enabled, self.file, self.tb, self.wandb = enabled, None, None, None
        if not enabled:
            return
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            set_aside_replayed(log_dir, start)
            self.file = open(os.path.join(log_dir, METRICS), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from e
            self.tb = SummaryWriter(
                tensorboard_dir or os.path.join(log_dir or "runs", "tensorboard")
            )
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(
                    "--wandb-project needs wandb: pip install 'megatron-glm[wandb]'"
                ) from e
            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"  # never block a cluster job on a login prompt
            self.wandb = wandb.init(project=wandb_project, config=config, dir=log_dir)

    def record(self, iteration: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.file:
            self.file.write(json.dumps({"iteration": iteration, **values}) + "\n")
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb:
            samples = values.get("consumed_samples")
            for k, v in numeric.items():
                tag = MEGATRON_TAGS.get(k, k)
                self.tb.add_scalar(tag, v, iteration)
                if k in MEGATRON_TAGS and samples is not None:
                    self.tb.add_scalar(f"{tag} vs samples", v, samples)
        if self.wandb:
            self.wandb.log(numeric, step=iteration)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class Throughput:
    """Tokens/s, TFLOP/s, MFU and ETA over the iterations since the last report."""

    def __init__(
        self,
        seq_length: int,
        flops_per_tok: float,
        total_iterations: int,
        start_iteration: int,
        start_consumed: int,
    ):
        self.seq, self.flops, self.total = seq_length, flops_per_tok, total_iterations
        self.peak = device_peak_flops()
        self.last_time, self.last_iter, self.last_consumed = (
            time.perf_counter(),
            start_iteration,
            start_consumed,
        )

    def report(self, iteration: int, consumed: int) -> dict:
        """``consumed``: samples so far (a ramping batch makes the early steps smaller)."""
        now = time.perf_counter()
        done = max(iteration - self.last_iter, 1)
        seconds = (now - self.last_time) / done
        tokens = (consumed - self.last_consumed) * self.seq / done
        self.last_time, self.last_iter, self.last_consumed = now, iteration, consumed
        tps = tokens / seconds
        out = {
            "iteration_time": seconds,
            "tokens_per_s": tps,
            "tflops": tps * self.flops / 1e12,
            "eta_s": seconds * (self.total - iteration),
        }
        if self.peak:
            out["mfu"] = tps * self.flops / self.peak
        return out
