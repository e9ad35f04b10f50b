"""glm-pretrain's training step on one GPU: tokens/s, MFU, step time and peak memory, variant beside variant.

Every variant trains the same model from the same initial weights on the same synthetic GLM
batches (Part A bidirectional, 15-40% Part B), through the DeepSpeed engine glm-pretrain builds
(bf16, ZeRO 0, one process). A variant names its parts with ``+``:

- the attention: ``flash`` (our Triton kernel), ``eager`` (the explicit fp32-softmax path, the
  baseline), ``flex`` (FlexAttention, compiled), ``sdpa``;
- ``fused``: torch's fused AdamW (``--optimizer-impl fused-adamw``) instead of the foreach one;
- ``apex``: apex's FusedAdam and FusedLayerNorm (``--optimizer-impl apex --layernorm-impl apex``);
- ``compile``: ``torch.compile`` of each transformer layer (``--compile-backend``, inductor).

MFU counts Megatron's ``72Lh^2 + 12Lhs + 6Vh`` training FLOPs per token (no recomputation)
against the device's dense bf16 peak. The baseline (``eager``) is ours, not an outside anchor.
Beside each measured CUDA peak stands glm-plan's estimate for the same layout.

``--smoke``: a tiny model on the CPU, two steps a variant: checks the script; timings mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

ATTENTION = ("flash", "eager", "flex", "sdpa")
DEFAULT_VARIANTS = ["eager", "flash", "flash+fused", "flash+fused+compile", "flex+fused"]


def parse_variant(name: str) -> dict:
    parts = name.split("+")
    attention = [p for p in parts if p in ATTENTION]
    unknown = [p for p in parts if p not in ATTENTION + ("fused", "apex", "compile")]
    if len(attention) != 1 or unknown or ("fused" in parts and "apex" in parts):
        raise SystemExit(
            f"train_throughput: variant {name!r}: one of {', '.join(ATTENTION)}, then any of +fused "
            "(or +apex) and +compile"
        )
    return {
        "attention": attention[0],
        "optimizer": "apex" if "apex" in parts else "fused-adamw" if "fused" in parts else "adamw",
        "layernorm": "apex" if "apex" in parts else "torch",
        "compile": "compile" in parts,
    }


def job_for(args, variant: dict):
    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.config import from_args

    argv = [
        "--data-path",
        "unused",
        "--tokenizer-model",
        "unused",
        "--train-iters",
        str(args.steps + args.warmup),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--seq-length",
        str(args.seq_length),
        "--attention-impl",
        variant["attention"],
        "--optimizer-impl",
        variant["optimizer"],
        "--layernorm-impl",
        variant["layernorm"],
        "--attention-dropout",
        "0",
        "--hidden-dropout",
        "0",
        "--lr",
        "1e-4",
        "--device",
        args.device,
    ]
    argv += ["--preset", args.preset] if args.preset else []
    argv += ["--num-layers", str(args.num_layers)] if args.num_layers else []
    argv += ["--bf16"] if args.bf16 else []
    argv += (
        ["--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.heads)]
        if args.hidden_size
        else []
    )
    return from_args(build_parser().parse_args(argv), world_size=1)


def glm_batch(b: int, s: int, vocab: int, device, seed: int = 0) -> dict:
    """A GLM-shaped batch: one segment per row, Part B the last 15-40% (causal), the rest bidirectional."""
    g = torch.Generator().manual_seed(seed)
    sep = torch.randint(int(0.6 * s), int(0.85 * s), (b,), generator=g)
    i = torch.arange(s)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    position_ids = torch.stack(
        [
            torch.minimum(i[None].expand(b, s), sep[:, None]),
            (i[None] - sep[:, None] + 1).clamp(min=0),
        ],
        dim=1,
    )
    batch = {
        "tokens": tokens,
        "position_ids": position_ids,
        "attn_lo": torch.zeros(b, s, dtype=torch.int32),
        "attn_hi": torch.maximum(sep[:, None], i[None] + 1).to(torch.int32),
        "labels": torch.roll(tokens, -1, 1),
        "loss_mask": (i[None] >= sep[:, None]).float(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def plan_peak(job, model_cfg, attention: str) -> int | None:
    """glm-plan's per-GPU peak for this one-GPU layout (CUDA runs only)."""
    from megatron_glm.plan.memory import Layout, Workload, estimate

    if attention not in ("flash", "sdpa", "eager"):
        return None
    micro = job.training.micro_batch_size
    workload = Workload(
        model_cfg, job.data.seq_length, micro, job.training.precision, attention, "cuda"
    )
    return estimate(workload, Layout(micro_batch=micro, zero=0))[0].peak


def run_variant(args, name: str, base_model, device) -> dict:
    from megatron_glm import kernels
    from megatron_glm.model.glm import TransformerLayer
    from megatron_glm.model.parallelize import apply_layernorm_impl
    from megatron_glm.training.engine import build_engine
    from megatron_glm.training.metrics import device_peak_flops, flops_per_token

    variant = parse_variant(name)
    job = job_for(args, variant)
    cfg = base_model.cfg
    model = copy.deepcopy(base_model)
    apply_layernorm_impl(model, variant["layernorm"])
    model.set_attention_impl(variant["attention"])
    kernels.set_backend("auto")
    if variant["compile"]:
        for layer in (m for m in model.modules() if isinstance(m, TransformerLayer)):
            layer.compile(backend=args.compile_backend)
    model.to(device)
    engine = build_engine(job, model, 1)
    batch = glm_batch(args.micro_batch_size, args.seq_length, cfg.vocab_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def step():
        logits = engine(batch["tokens"], batch["position_ids"], batch["attn_lo"], batch["attn_hi"])
        loss = model.loss(logits, batch["labels"], batch["loss_mask"])[0]
        engine.backward(loss)
        engine.step()
        return loss

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    times.sort()
    seconds = times[len(times) // 2]
    tokens_per_s = args.micro_batch_size * args.seq_length / seconds
    per_token = flops_per_token(cfg.num_layers, cfg.hidden_size, args.seq_length, cfg.vocab_size)
    peak_flops = device_peak_flops()
    row = {
        "variant": name,
        **variant,
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "seq": args.seq_length,
        "micro_batch": args.micro_batch_size,
        "step_ms": 1e3 * seconds,
        "tokens_per_s": tokens_per_s,
        "tflops": tokens_per_s * per_token / 1e12,
        "mfu": tokens_per_s * per_token / peak_flops if peak_flops else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        estimated = plan_peak(job, cfg, variant["attention"])
        row["plan_gib"] = estimated / 2**30 if estimated else None
    return row  # the engine and model go with this frame; the caller empties the CUDA cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="glm-large")
    p.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="fewer layers than the preset (to fit the time)",
    )
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile's backend for +compile"
    )
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script")
    args = p.parse_args(argv)
    args.bf16 = True
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.preset, args.num_layers, args.hidden_size, args.heads = None, 2, 64, 4
        args.seq_length, args.micro_batch_size, args.steps, args.warmup = 64, 2, 2, 1
        # traced forward and backward without code generation: quick on a CPU
        args.compile_backend = "aot_eager"
        args.bf16 = False  # the Triton interpreter has no bf16
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    device = torch.device(args.device)
    variants = [
        v
        for v in args.variants
        if not (device.type == "cpu" and parse_variant(v)["attention"] == "flex")
    ]
    skipped = sorted(set(args.variants) - set(variants))

    from megatron_glm.model.glm import GLMModel
    from megatron_glm.training.engine import init_distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    job = job_for(args, parse_variant("eager"))
    cfg = job.model_config(50304 if not args.smoke else 1024)  # GPT-2's vocabulary, padded
    init_distributed(args.device, 1, 1, cfg)
    with torch.device("meta"):
        base = GLMModel(cfg)
    base.to_empty(device="cpu")
    base.reset_parameters(seed=1234)
    print(
        f"train_throughput: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}, "
        f"seq {args.seq_length}, micro-batch {args.micro_batch_size}, {'bf16' if args.bf16 else 'fp32'}, "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}"
        + (f" (layers reduced from {args.preset}'s)" if args.num_layers and args.preset else ""),
        flush=True,
    )
    if skipped:
        print(f"  not run here: {', '.join(skipped)} (FlexAttention has no backward on the CPU)")
    rows = []
    for name in variants:
        try:
            row = run_variant(args, name, base, device)
        except (
            ImportError,
            ValueError,
            RuntimeError,
        ) as e:  # apex missing, an impossible variant, out of memory
            print(f"  {name:28s} not run: {str(e).splitlines()[0][:200]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        extra = f"  MFU {row['mfu']:.1%}" if row.get("mfu") else ""
        if "peak_gib" in row:
            plan = f" (glm-plan {row['plan_gib']:.2f})" if row.get("plan_gib") else ""
            extra += f"  peak {row['peak_gib']:.2f} GiB{plan}"
        print(
            f"  {name:28s} {row['step_ms']:9.1f} ms/step  {row['tokens_per_s']:11,.0f} tok/s  "
            f"{row['tflops']:7.1f} TFLOP/s{extra}  loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}",
            flush=True,
        )
    base_row = next((r for r in rows if r["variant"] == "eager"), None)
    for r in rows:
        if base_row and r is not base_row:
            print(
                f"    {r['variant']} / eager: {r['tokens_per_s'] / base_row['tokens_per_s']:.2f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "device": rows
                    and (torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                    "rows": rows,
                    "skipped": skipped,
                },
                f,
                indent=1,
            )
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
