"""A user's DeepSpeed JSON (``--deepspeed-config``): every key honoured or refused, none ignored.

glm-pretrain writes DeepSpeed's configuration from its flags and hands the engine its own AdamW
and learning-rate schedule. A JSON's keys win over the flags they set, so they are folded into
the job here, before any work, and the banner and checkpoints report what ran:

- ``zero_optimization`` (its ``stage``, ``offload_optimizer``), ``gradient_clipping``,
  ``bf16``/``fp16`` ``enabled``: the job's ZeRO stage, clipping and precision;
- an ``optimizer`` block of type Adam or AdamW: its ``lr``, ``betas``, ``eps`` and
  ``weight_decay`` become the AdamW's; any other optimizer, or a key we would not apply, is
  refused;
- a ``scheduler`` block is refused: DeepSpeed's warm-up shapes differ from ours (WarmupLR warms
  up logarithmically by default), so it names the flags that set the schedule instead;
- the batch keys must agree with the flags (a contradiction would make the engine step at
  another interval than the loop): ``train_micro_batch_size_per_gpu``,
  ``gradient_accumulation_steps``, ``train_batch_size``.

Everything else (communication, profiling, activation-checkpointing options of DeepSpeed's own)
goes to the engine unchanged. DeepSpeed itself ignores a top-level key it does not know, so a
typo (``gradient_cliping``) would run with the default without a word: a key close to one of
DeepSpeed's is refused with the name it was meant to be, any other unknown key is warned about.
``zero_optimization`` is checked against DeepSpeed's own model of it here, before any work.
"""

from __future__ import annotations

import difflib
import json
import logging

logger = logging.getLogger(__name__)
ADAM_KEYS = {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode", "bias_correction"}
# DeepSpeed's top-level sections (its documented JSON); the plain settings come from its constants module
SECTIONS = {
    "zero_optimization",
    "activation_checkpointing",
    "flops_profiler",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comms_logger",
    "compile",
    "data_efficiency",
    "aio",
    "pipeline",
    "autotuning",
    "elasticity",
    "nebula",
    "compression_training",
    "hybrid_engine",
    "timers",
    "amp",
    "sparse_attention",
    "curriculum_learning",
    "eigenvalue",
    "progressive_layer_drop",
    "weight_quantization",
    "graph_harvesting",
    "monitor_config",
    "checkpoint",
    "data_types",
    "bf16",
    "fp16",
    "torch_autocast",
    "optimizer",
    "scheduler",
}


def deepspeed_keys() -> set[str]:
    from deepspeed.runtime import constants

    return SECTIONS | {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}


def unknown_keys(config: dict, name: str) -> list[str]:
    """Problems for top-level keys that are typos of DeepSpeed's; a warning for other keys it does not know."""
    known, problems = deepspeed_keys(), []
    for key in sorted(set(config) - known):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            problems.append(
                f"{name}: {key!r} is not a DeepSpeed key (DeepSpeed would ignore it): did you mean "
                f"{close[0]!r}?"
            )
        else:
            logger.warning(f"{name}: DeepSpeed has no key {key!r} and ignores it")
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError

        try:
            DeepSpeedZeroConfig(**zero)
        except ValidationError as e:
            wrong = "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
            )
            problems.append(f"{name}: zero_optimization is not DeepSpeed's: {wrong}")
    return problems


def read(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--deepspeed-config {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--deepspeed-config {path}: not a JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"--deepspeed-config {path}: a DeepSpeed config is a JSON object, this holds a "
            f"{type(config).__name__}"
        )
    return config


def fold(
    config: dict, micro_batch_size: int, global_batch_size: int, data_parallel_size: int, path: str
) -> tuple[dict, dict, list[str]]:
    """(what the engine gets from the JSON, the flags it overrides ``{dest: value}``, problems)."""
    config = dict(config)
    name = f"--deepspeed-config {path}"
    problems, flags = unknown_keys(config, name), {}

    micro, accum, total = (
        config.get(k)
        for k in (
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "train_batch_size",
        )
    )
    step = micro_batch_size * data_parallel_size
    for key, value, ours, flag in (
        ("train_micro_batch_size_per_gpu", micro, micro_batch_size, "--micro-batch-size"),
        (
            "gradient_accumulation_steps",
            accum,
            global_batch_size // step if step else None,
            "--global-batch-size / (--micro-batch-size x data-parallel size)",
        ),
        ("train_batch_size", total, global_batch_size, "--global-batch-size"),
    ):
        if value is not None and value != ours:
            problems.append(
                f"{name} sets {key} {value}, the flags give {ours} ({flag}): make them agree, or drop "
                "the key"
            )

    zero = config.get("zero_optimization") or {}
    if "stage" in zero:
        flags["zero_stage"] = zero["stage"]
    if "offload_optimizer" in zero:
        flags["cpu_offload"] = (zero["offload_optimizer"] or {}).get("device", "none") == "cpu"
    if "gradient_clipping" in config:
        flags["clip_grad"] = config["gradient_clipping"]
        if not isinstance(flags["clip_grad"], (int, float)) or flags["clip_grad"] < 0:
            problems.append(
                f"{name} sets gradient_clipping {config['gradient_clipping']}: give a norm >= 0 (0: off)"
            )
    for precision in ("bf16", "fp16"):
        if "enabled" in (config.get(precision) or {}):
            flags[precision] = bool(config[precision]["enabled"])
    if flags.get("bf16") and flags.get("fp16"):
        problems.append(f"{name} enables both bf16 and fp16: enable one")

    optimizer = config.pop("optimizer", None)
    if optimizer is not None:
        kind, params = str(optimizer.get("type", "")), dict(optimizer.get("params") or {})
        unknown = sorted(set(params) - ADAM_KEYS)
        if kind.lower() not in ("adam", "adamw"):
            problems.append(
                f"{name}: optimizer {kind!r} is not what glm-pretrain trains with (AdamW); remove the "
                "block, or give type AdamW"
            )
        elif unknown:
            problems.append(
                f"{name}: optimizer params {unknown} have no AdamW equivalent here; remove them"
            )
        elif (
            params.get("adam_w_mode", True) is False or params.get("bias_correction", True) is False
        ):
            problems.append(
                f"{name}: adam_w_mode/bias_correction false (L2-regularised or uncorrected Adam) is not "
                "supported; glm-pretrain's AdamW decouples weight decay"
            )
        else:
            for key, dest in (("lr", "lr"), ("eps", "adam_eps"), ("weight_decay", "weight_decay")):
                if key in params:
                    flags[dest] = params[key]
            if "betas" in params:
                flags["adam_beta1"], flags["adam_beta2"] = params["betas"]
    scheduler = config.pop("scheduler", None)
    if scheduler is not None:
        problems.append(
            f"{name}: the scheduler block ({scheduler.get('type', '?')}) is not used: the schedule comes "
            "from --lr, --min-lr, --lr-decay-style, --lr-warmup-iters or --lr-warmup-fraction and "
            "--lr-decay-iters; remove the block and pass those"
        )
    return config, flags, problems
