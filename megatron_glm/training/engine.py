"""Process groups, the optimizer and the DeepSpeed engine that owns the step.

The engine owns the optimizer step, gradient accumulation, clipping and mixed precision;
``deepspeed_config`` writes its JSON from the job, with a user's ``--deepspeed-config`` keys
(already folded into the job, ``deepspeed_json.py``) on top.
"""

from __future__ import annotations

from megatron_glm.checkpoint.format import decays
from megatron_glm.settings import OPTIMIZER_IMPLS
from megatron_glm.training.config import JobConfig

DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce/all-gather bucket, in elements


def init_distributed(device: str, tp: int, pp: int, model_cfg) -> None:
    """Process groups from whatever launched us (torchrun, Slurm, MPI, or nothing), then DeepSpeed's comm."""
    import deepspeed

    from megatron_glm.parallel import state

    state.initialize_model_parallel(
        tp=tp,
        pp=pp,
        backend="nccl" if device == "cuda" else "gloo",
        num_attention_heads=model_cfg.num_attention_heads,
        hidden_size=model_cfg.hidden_size,
        vocab_size=model_cfg.vocab_size,
    )
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)


def numel(p) -> int:
    """A parameter's elements, also when ZeRO-3 has partitioned it (its data is then empty)."""
    return getattr(p, "ds_numel", p.numel())


def zero3_partitioner(job: JobConfig, engine_steps: int, rank_params: int):
    """ZeRO-3's partitioning for ``build_rank_model``: a submodule's parameters, as soon as they exist, become
    this rank's data-parallel partition of them (DeepSpeed's ``zero.Init`` on that submodule), so that at most
    one full tensor exists at a time, on the host or the device. The engine then finds them partitioned."""
    import deepspeed
    import torch

    from megatron_glm.parallel import state

    config = deepspeed_config(job, engine_steps, rank_params)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        job.training.precision, torch.float32
    )

    def partition(module) -> None:
        deepspeed.zero.Init(
            module=module,
            data_parallel_group=state.get_data_parallel_group(),
            config_dict_or_path=config,
            dtype=dtype,
            mem_efficient_linear=False,  # a module given: no context, so no global patch of F.linear
            mpu=state,
        )

    return partition


def bucket_elements(rank_params: int | None) -> int:
    """ZeRO's communication buckets, capped at this rank's parameter count.

    DeepSpeed allocates its buckets at their configured size (500M elements: 2 GB in fp32) however
    small the model; a bucket larger than the parameters it carries buys nothing.
    """
    return DEEPSPEED_BUCKET if rank_params is None else max(min(DEEPSPEED_BUCKET, rank_params), 1)


def deepspeed_config(job: JobConfig, grad_accum: int, rank_params: int | None = None) -> dict:
    bucket = bucket_elements(rank_params)
    par = job.parallel
    config = {
        "train_micro_batch_size_per_gpu": job.training.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": job.optimizer.clip_grad,
        "zero_optimization": {
            "stage": par.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            **({"stage3_prefetch_bucket_size": bucket} if par.zero_stage == 3 else {}),
            **({"offload_optimizer": {"device": "cpu"}} if par.cpu_offload else {}),
        },
        # our AdamW serves with offload too (DeepSpeed would otherwise insist on its compiled CPU Adam)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": job.training.precision == "bf16"},
        "fp16": {
            "enabled": job.training.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    # --deepspeed-config's keys (training/deepspeed_json.py)
    for key, value in job.deepspeed_overrides.items():
        merge = isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = {**config[key], **value} if merge else value
    return config


def param_groups(model, weight_decay: float):
    """The decayed parameters, then the others (a checkpoint's optimizer state follows this order)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if decays(name) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(impl: str, groups, lr: float, betas, eps: float):
    """AdamW as ``--optimizer-impl`` says: torch's foreach AdamW, torch's fused one, or apex's FusedAdam."""
    import torch

    if impl == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"--optimizer-impl {impl!r}: choose one of {', '.join(OPTIMIZER_IMPLS)}")
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, fused=impl == "fused-adamw" or None
    )


def build_engine(job: JobConfig, module, engine_steps: int):
    """The DeepSpeed engine that steps ``module``: our AdamW and lr schedule inside, ZeRO, clipping and mixed
    precision as the job says; ``engine_steps``: backward calls per optimizer step."""
    import deepspeed

    from megatron_glm.parallel import state

    opt = job.optimizer
    schedule = job.schedule.build()
    optimizer = make_optimizer(
        opt.optimizer_impl,
        param_groups(module, opt.weight_decay),
        job.schedule.lr,
        opt.betas,
        opt.adam_eps,
    )
    config = deepspeed_config(job, engine_steps, sum(numel(p) for p in module.parameters()))
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=schedule.as_torch(optimizer),
        config=config,
        mpu=state,
    )
    return engine
