"""glm-pretrain: the pretraining loop, driving the DeepSpeed engine one micro-batch at a time.

The engine owns the optimizer step, gradient accumulation, clipping and mixed precision;
this loop owns the data (sample indices from ``consumed_samples``, the blank-infilling
collator), validation, metrics and checkpoints. Everything that depends on randomness is
seeded or checkpointed, so a resumed run repeats an uninterrupted one exactly (bitwise on CPU).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time


class TrainingError(RuntimeError):
    """A run that must stop (a non-finite loss, say); the last complete checkpoint stays the latest."""


def init_distributed(device: str, tp: int, pp: int, model_cfg) -> None:
    """Process groups from whatever launched us (torchrun, Slurm, MPI, or nothing), then DeepSpeed's comm."""
    import deepspeed

    from megatron_glm.parallel import state

    state.initialize_model_parallel(tp=tp, pp=pp, backend="nccl" if device == "cuda" else "gloo",
                                    num_attention_heads=model_cfg.num_attention_heads,
                                    hidden_size=model_cfg.hidden_size, vocab_size=model_cfg.vocab_size)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)


DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce/all-gather bucket, in elements


def bucket_elements(rank_params: int | None) -> int:
    """ZeRO's communication buckets, capped at this rank's parameter count.

    DeepSpeed allocates its buckets at their configured size (500M elements: 2 GB in fp32) however
    small the model; a bucket larger than the parameters it carries buys nothing.
    """
    return DEEPSPEED_BUCKET if rank_params is None else max(min(DEEPSPEED_BUCKET, rank_params), 1)


def deepspeed_config(args, grad_accum: int, rank_params: int | None = None) -> dict:
    bucket = bucket_elements(rank_params)
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": args.clip_grad,
        "zero_optimization": {"stage": args.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                              **({"stage3_prefetch_bucket_size": bucket} if args.zero_stage == 3 else {}),
                              **({"offload_optimizer": {"device": "cpu"}} if args.cpu_offload else {})},
        # our AdamW serves with offload too (DeepSpeed would otherwise insist on its compiled CPU Adam)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": args.bf16},
        "fp16": {"enabled": args.fp16, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            user = json.load(f)
        for key, value in user.items():  # the JSON wins over the flags it sets
            merge = isinstance(value, dict) and isinstance(config.get(key), dict)
            config[key] = {**config[key], **value} if merge else value
    return config


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
        raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror}); choose a folder you can write to") \
            from None


def param_groups(model, weight_decay: float):
    """No weight decay on biases and LayerNorm parameters (Megatron's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "layernorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(argv=None) -> dict:
    """Run glm-pretrain; returns a summary (iterations done, last losses)."""
    from megatron_glm.training.arguments import build_parser, model_config_from_args, validate_args

    args = build_parser().parse_args(argv)
    from megatron_glm.parallel.state import discover_launch

    validate_args(args, world_size=int(os.environ.get("WORLD_SIZE", 0)) or discover_launch().world_size)

    import numpy as np
    import torch

    from megatron_glm import faults, kernels
    from megatron_glm.data.blank_infilling import (
        OBJECTIVES,
        BlankInfillingCollator,
        BlankInfillingConfig,
        SpecialIds,
        sentence_end_ids,
    )
    from megatron_glm.data.blended_dataset import build_train_valid_test_datasets
    from megatron_glm.data.loader import BatchStream, MicroBatches, collate_now
    from megatron_glm.data.sampler import PretrainingSampler
    from megatron_glm.data.tokenizer import GLMTokenizer, spec_from_args
    from megatron_glm.parallel.pipeline import partition_layers
    from megatron_glm.training import checkpoint as ckpt
    from megatron_glm.training.lr_schedule import LRSchedule
    from megatron_glm.training.memory import host_memory, reset_host_peak
    from megatron_glm.training.metrics import MetricsLogger, Throughput, flops_per_token, memory_summary
    from megatron_glm.training.preemption import EXIT_INTERRUPTED, EXIT_REQUEUE, Preemption
    from megatron_glm.training.step import StepRunner

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA GPU is visible here (or this torch is a CPU build); "
                         "use --device cpu, or auto")
    for flag, folder in (("--save", args.save), ("--log-dir", args.log_dir)):
        if folder:
            check_writable(flag, folder)
    if args.fp16 and device == "cpu":
        raise ValueError("--fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 optimizer); use --bf16 on CPU")
    meter = None
    if args.measure_memory:
        from megatron_glm.training.memory import MemoryMeter

        meter = MemoryMeter(device)
    tokenizer = GLMTokenizer(spec_from_args(args))
    tp = args.tensor_model_parallel_size
    model_cfg = model_config_from_args(args, tokenizer.padded_vocab_size(tp))
    if not args.load and args.save and ckpt.resume_tag(args.save):  # a restarted (requeued) job carries on
        args.load = args.save
    load_tag = ckpt.resume_tag(args.load) if args.load else None
    if load_tag:  # refuse an incompatible checkpoint before any work (and before anything is written)
        ckpt.check_compatible(ckpt.read_meta(args.load, load_tag), model_cfg, tokenizer.fingerprint(), args.load, tp,
                              args.pipeline_model_parallel_size)

    pp = args.pipeline_model_parallel_size
    per_chunk = args.num_layers_per_virtual_pipeline_stage
    if per_chunk and model_cfg.num_layers % (pp * per_chunk):
        raise ValueError(f"--num-layers {model_cfg.num_layers} is not divisible by --pipeline-model-parallel-size "
                         f"{pp} x --num-layers-per-virtual-pipeline-stage {per_chunk}")
    vpp = model_cfg.num_layers // (pp * per_chunk) if per_chunk else 1
    partition_layers(model_cfg.num_layers, pp, vpp, args.pipeline_layers)  # an impossible split fails here
    init_distributed(device, tp, pp, model_cfg)
    import deepspeed
    import torch.distributed as dist

    from megatron_glm.model.parallelize import RankLayout, build_rank_model, count_parameters
    from megatron_glm.parallel import state
    from megatron_glm.parallel.pipeline_stage import TiedEmbedding
    from megatron_glm.parallel.random import model_parallel_seed

    rank = dist.get_rank()
    dp_rank, world = state.get_data_parallel_rank(), state.get_data_parallel_world_size()
    grad_accum = args.global_batch_size // (args.micro_batch_size * world)
    n_eval = args.eval_iters * args.micro_batch_size if args.eval_interval <= args.train_iters else 0
    train_ds, valid_ds, _ = build_train_valid_test_datasets(
        args.data_path, args.split, args.seq_length, [args.train_iters * args.global_batch_size, n_eval or 0, 0],
        seed=args.seed, cache_dir=args.data_cache_path, tokenizer=tokenizer)
    bi_cfg = BlankInfillingConfig(
        seq_length=args.seq_length, token_prob=args.bert_prob, sentence_prob=args.gap_sentence_prob,
        mask_ratio=args.mask_ratio, poisson_lambda=args.poisson_lambda, sentence_ratio=args.gap_sentence_ratio,
        gmask_min_ratio=args.gpt_min_ratio, gpt_infill_prob=args.gpt_infill_prob,
        block_mask_prob=args.block_mask_prob, context_mask_ratio=args.context_mask_ratio,
        context_mask_range=args.context_mask_range, random_position=args.random_position,
        shuffle_spans=not args.no_shuffle_blocks,
        single_span_prob=args.single_span_prob, short_seq_prob=args.short_seq_prob,
        task_mask=not args.no_task_mask, packed=args.packed_segments, seed=args.seed)
    ends = sentence_end_ids(tokenizer) if args.gap_sentence_prob > 0 else None
    collate = BlankInfillingCollator(bi_cfg, SpecialIds.from_tokenizer(tokenizer), ends)

    random.seed(args.seed)
    np.random.seed(args.seed)
    model_parallel_seed(args.seed, state.get_tensor_model_parallel_rank())
    kernels.set_backend(args.kernels)
    load_meta = ckpt.read_meta(args.load, load_tag) if load_tag else None
    weights_only = bool(load_meta and load_meta.get("weights_only"))
    layout = RankLayout.from_state(vpp, args.pipeline_layers)
    reset_host_peak()
    host_before = host_memory()
    # only this rank's chunks, built on the meta device; weights: a converted checkpoint's rank file, or the
    # seed's initialisation (bitwise the slice of the one-process model's)
    chunks = build_rank_model(
        model_cfg, layout, args.seed, args.sequence_parallel,
        (args.recompute_granularity, args.recompute_method, args.recompute_num_layers), args.attention_impl,
        weights=(lambda: ckpt.read_weights_only(args.load, load_tag, layout.pp_rank, layout.tp_rank, tp,
                                                args.trust_checkpoint)) if weights_only else None)
    n_params = count_parameters(model_cfg, tp)
    host_after = host_memory()
    setup_peak = host_after["peak_rss_bytes"] - host_before["rss_bytes"] if host_after else None
    module = chunks[0] if len(chunks) == 1 else torch.nn.ModuleList(chunks)
    state.mark_for_gradient_norm(module.parameters())
    module = module.to(device)
    schedule = LRSchedule(args.lr, args.min_lr, args.lr_decay_style,
                          args.lr_warmup_iters or int(round((args.lr_warmup_fraction or 0.0) * args.train_iters)),
                          args.lr_decay_iters or args.train_iters)
    optimizer = torch.optim.AdamW(param_groups(module, args.weight_decay), lr=args.lr,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    # one engine.backward per micro-batch and chunk: that is the engine's accumulation count
    ds_config = deepspeed_config(args, grad_accum * len(chunks), sum(p.numel() for p in module.parameters()))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule.as_torch(optimizer),
                                           config=ds_config, mpu=state)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    tied = TiedEmbedding(chunks, dtype)
    iteration, consumed = 0, 0
    if load_tag:
        meta = load_meta if weights_only else ckpt.load_checkpoint(engine, args.load, load_tag, args.trust_checkpoint)
        iteration, consumed = meta["iteration"], meta["consumed_samples"]
    tied.broadcast_weight()
    seq_local = args.seq_length // tp if args.sequence_parallel else args.seq_length
    runner = StepRunner(engine, chunks, tied, grad_accum, vpp, (args.micro_batch_size, seq_local,
                        model_cfg.hidden_size), dtype, device)
    if meter:
        meter.mark()

    log = MetricsLogger(args.log_dir or args.save, args.tensorboard, args.wandb_project, vars(args), rank == 0)
    log.console(f"glm-pretrain: {n_params / 1e6:.2f} M parameters (this TP rank's share), "
                f"{model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, vocab {model_cfg.vocab_size} "
                f"(padded), seq {args.seq_length}, global batch {args.global_batch_size} = {args.micro_batch_size} "
                f"x {grad_accum} accumulation x {world} data-parallel ranks, TP {tp}"
                f"{' + sequence parallel' if args.sequence_parallel else ''}, PP {pp}"
                f"{f' x {vpp} virtual' if vpp > 1 else ''}, ZeRO {args.zero_stage}, device {device}"
                + (f"; resumed from {args.load}/{load_tag} at iteration {iteration}" if load_tag else "")
                + (" (converted weights; the optimizer state starts fresh)" if weights_only else ""))
    rank_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if setup_peak is not None:
        log.console(f"model set-up (rank {rank}): {rank_bytes / 2**20:,.0f} MiB of weights built, host memory peak "
                    f"+{setup_peak / 2**20:,.0f} MiB")
    meta_base = {"model": model_cfg.to_dict(), "tokenizer": tokenizer.describe(), "seq_length": args.seq_length,
                 "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                 "pipeline_layers": [[[r.start, r.stop] for r in stage] for stage in
                                     partition_layers(model_cfg.num_layers, pp, vpp, args.pipeline_layers)],
                 "args": {k: v for k, v in vars(args).items()
                          if isinstance(v, (int, float, str, bool, list, type(None)))}}
    micro_batches = MicroBatches(train_ds, collate, model_cfg.vocab_size)
    stream = BatchStream(micro_batches, PretrainingSampler(len(train_ds), consumed, args.micro_batch_size, dp_rank,
                                                           world), args.num_workers, pin_memory=device == "cuda")
    speed = Throughput(args.global_batch_size * args.seq_length,
                       flops_per_token(model_cfg.num_layers, model_cfg.hidden_size, args.seq_length,
                                       model_cfg.vocab_size),
                       args.train_iters, iteration)

    def to_device(batch):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def evaluate() -> float:
        valid = MicroBatches(valid_ds, collate, model_cfg.vocab_size)
        return runner.evaluate([to_device(collate_now(valid, range(k * args.micro_batch_size,
                                                                   (k + 1) * args.micro_batch_size)))
                                for k in range(args.eval_iters)])

    last_saved = load_tag
    history = []
    exit_code = 0
    preemption = Preemption(args.stop_file, device, rank)
    engine.train()
    try:
        while iteration < args.train_iters:
            batches, data_wait = [], 0.0
            for _ in range(grad_accum):
                batch, waited = stream.next()
                batches.append(to_device(batch))
                data_wait += waited
            values = runner.train(batches, inject_overflow=faults.overflow_at(iteration + 1))
            values["data_wait_ms"] = 1000.0 * data_wait
            lm_loss, norm = values["lm_loss"], values["grad_norm"]
            iteration += 1
            consumed += args.global_batch_size
            if not math.isfinite(lm_loss) and not args.fp16:
                raise TrainingError(
                    f"loss is {lm_loss} at iteration {iteration}; stopped without saving, the latest checkpoint is "
                    f"{last_saved or 'none'}. Lower --lr, raise --clip-grad or --lr-warmup-iters, or check the data")
            values.update({"lr": engine.get_lr()[0], "consumed_samples": consumed,
                           "skipped_steps": int(getattr(engine, "skipped_steps", 0))})
            if args.fp16:
                scale = getattr(engine.optimizer, "cur_scale", None)
                values["loss_scale"] = float(scale) if scale is not None else None
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                values.update(speed.report(iteration))
                parts = [f"iter {iteration}/{args.train_iters}", f"loss {lm_loss:.4f}"]
                parts += [f"{n} {values['loss_' + n]:.3f}" for n in OBJECTIVES if "loss_" + n in values]
                parts += [f"lr {values['lr']:.2e}", f"grad {norm:.3f}", f"{values['tokens_per_s']:,.0f} tok/s",
                          f"{values['tflops']:.2f} TFLOP/s", f"data wait {values['data_wait_ms']:.1f} ms"]
                if "mfu" in values:
                    parts.append(f"MFU {values['mfu']:.1%}")
                parts += [memory_summary(), f"ETA {time.strftime('%H:%M:%S', time.gmtime(values['eta_s']))}"]
                log.console(" | ".join(parts))
            if valid_ds is not None and iteration % args.eval_interval == 0:
                values["valid_loss"] = evaluate()
                log.console(f"validation at iter {iteration}: loss {values['valid_loss']:.4f} "
                            f"(ppl {math.exp(min(values['valid_loss'], 50)):.2f})")
            log.record(iteration, values)
            history.append(lm_loss)
            faults.crash_point(f"iteration:{iteration}")
            if args.save and ((args.save_interval and iteration % args.save_interval == 0)
                              or iteration == args.train_iters):
                folder = ckpt.save_checkpoint(engine, args.save, iteration, {**meta_base, "consumed_samples": consumed},
                                              args.keep_last, rank)
                last_saved = os.path.basename(folder)
                log.console(f"saved {folder}")
            reason = preemption.wait() if faults.holds_after(iteration) else preemption.requested()
            if reason and iteration < args.train_iters:
                if args.save and last_saved != ckpt.tag_of(iteration):
                    folder = ckpt.save_checkpoint(engine, args.save, iteration,
                                                  {**meta_base, "consumed_samples": consumed}, args.keep_last, rank)
                    last_saved = os.path.basename(folder)
                exit_code = EXIT_INTERRUPTED if reason == "SIGINT" else EXIT_REQUEUE
                log.console(f"stopping after iteration {iteration} ({reason}): "
                            + (f"saved {args.save}/{last_saved}; " if args.save else "no --save, nothing saved; ")
                            + ("exit status 130 (interrupted); run the same command to resume" if exit_code ==
                               EXIT_INTERRUPTED else f"exit status {EXIT_REQUEUE} asks the launcher to requeue"))
                break
        if meter:
            from megatron_glm.training.memory import write_report

            write_report(args.log_dir or args.save, rank, meter.finish(),
                         {"tp_rank": state.get_tensor_model_parallel_rank(),
                          "pp_rank": state.get_pipeline_model_parallel_rank(), "dp_rank": dp_rank,
                          "setup_host_peak_bytes": setup_peak, "rank_weight_bytes": rank_bytes})
    finally:
        stream.close()
        preemption.close()
        log.close()
    return {"iteration": iteration, "losses": history, "model": chunks[0] if len(chunks) == 1 and pp == 1 else None,
            "tokenizer": tokenizer, "exit_code": exit_code}


def main(argv=None) -> int:
    import faulthandler

    from megatron_glm.data.indexed import IndexedDatasetError
    from megatron_glm.data.loader import DataError
    from megatron_glm.data.tokenizer import TokenizerError
    from megatron_glm.training.checkpoint import CheckpointError

    faulthandler.enable()  # a rank that dies on a signal (SIGABRT, SIGSEGV) prints every thread's Python stack
    try:
        result = pretrain(argv)
    except (ValueError, TokenizerError, IndexedDatasetError, CheckpointError, FileNotFoundError, TrainingError,
            DataError) as e:
        print(f"glm-pretrain: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop's handler was set, or a second Ctrl-C
        print("glm-pretrain: interrupted; the latest complete checkpoint is untouched", file=sys.stderr)
        return 130
    import torch.distributed as dist

    if dist.is_initialized():  # leave together: gloo aborts a rank whose peer has gone
        dist.barrier()
        dist.destroy_process_group()
    return result["exit_code"]


def cli() -> None:
    """The ``glm-pretrain`` command: ``main``, then leave without the interpreter's teardown.

    Every file is written and closed by then. Gloo's worker threads can still be joinable during
    interpreter finalization and ``std::terminate`` the process (SIGABRT) after a successful run,
    so the command exits directly.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
