"""Fused kernels against their baselines, measured side by side in one run on one GPU.

Attention (forward + backward, bf16): our GLM-mask flash kernel, FlexAttention with the
same mask (compiled), SDPA with a dense boolean mask (what the original implementation
effectively computes), and SDPA causal (the flash backend) as the ceiling. TFLOP/s counts
only the unmasked work: ``4 * D`` FLOPs per allowed (query, key) pair forward and 2.5 times
that backward, so a masked-out pair earns nothing and causal is counted the same way.
Then the masked softmax, the 2D embeddings and the 2D rotary against their unfused torch
paths. Every figure prints with the device, dtype and shapes; ``--json`` writes them.

``--smoke`` runs every method once at tiny shapes (on the CPU under TRITON_INTERPRET=1)
to check the script itself; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from megatron_glm import kernels
from megatron_glm.kernels import reference


def glm_bounds(batch: int, s: int, device, seed: int = 0):
    """One GLM segment per row, Part A ending at a random ``sep`` in [0.6 s, 0.9 s) (15% to 40% in Part B)."""
    g = torch.Generator().manual_seed(seed)
    sep = torch.randint(int(0.6 * s), int(0.9 * s), (batch,), generator=g)
    i = torch.arange(s)
    lo = torch.zeros(batch, s, dtype=torch.int32)
    hi = torch.maximum(sep[:, None], i[None] + 1).to(torch.int32)
    return lo.to(device), hi.to(device)


def allowed_pairs(lo, hi) -> int:
    return int((hi - lo).sum())


def timed(fn, device, warmup: int, reps: int) -> tuple[float, float]:
    """(median seconds, peak bytes above the starting allocation)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        peak = 0
    times.sort()
    return times[len(times) // 2], peak


def fwd_bwd(attn, q, k, v):
    def run():
        out = attn(q, k, v)
        out.backward(torch.ones_like(out))
        q.grad = k.grad = v.grad = None

    return run


def attention_methods(lo, hi, s, device, compile_flex: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[b, q_idx]) & (kv_idx < hi[b, q_idx])

    block_mask = create_block_mask(mask_mod, lo.shape[0], None, s, s, device=str(device))
    flex = torch.compile(flex_attention) if compile_flex else flex_attention
    dense = reference.interval_mask(lo, hi, s)[:, None]
    return {
        "glm-flash (ours)": lambda q, k, v: kernels.flash_attention(q, k, v, lo, hi),
        "flex-attention": lambda q, k, v: flex(q, k, v, block_mask=block_mask),
        "sdpa dense mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
        "sdpa causal (ceiling)": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True
        ),
    }


def bench_attention(args, device, dtype, results):
    for s in args.seq:
        for d in args.head_dim:
            batch = max(1, args.tokens // s)
            heads = args.hidden // d
            lo, hi = glm_bounds(batch, s, device)
            q, k, v = (
                torch.randn(batch, heads, s, d, device=device, dtype=dtype, requires_grad=True)
                for _ in range(3)
            )
            glm_pairs, causal_pairs = allowed_pairs(lo, hi), batch * s * (s + 1) // 2
            rows = {}
            for name, attn in attention_methods(
                lo, hi, s, device, compile_flex=device.type == "cuda"
            ).items():
                pairs = causal_pairs if "causal" in name else glm_pairs
                try:
                    sec, peak = timed(fwd_bwd(attn, q, k, v), device, args.warmup, args.reps)
                except torch.OutOfMemoryError:
                    print(f"  {name:24s} s={s:5d} d={d:3d}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                except NotImplementedError as e:  # FlexAttention has no CPU backward (--smoke)
                    print(
                        f"  {name:24s} s={s:5d} d={d:3d}: not run here ({str(e).splitlines()[0]})"
                    )
                    continue
                tflops = 3.5 * 4 * d * pairs * heads / sec / 1e12
                rows[name] = tflops
                results.append(
                    dict(
                        kernel="attention",
                        method=name,
                        seq=s,
                        head_dim=d,
                        batch=batch,
                        heads=heads,
                        dtype=str(dtype),
                        ms=sec * 1e3,
                        tflops=tflops,
                        peak_mib=peak / 2**20,
                        density=glm_pairs / (batch * s * s),
                    )
                )
                print(
                    f"  {name:24s} s={s:5d} d={d:3d} B={batch:3d} H={heads:3d}: {sec * 1e3:8.3f} ms "
                    f"{tflops:7.1f} TFLOP/s  peak {peak / 2**20:8.1f} MiB"
                )
            ours = rows.get("glm-flash (ours)")
            for base in ("flex-attention", "sdpa dense mask", "sdpa causal (ceiling)"):
                if ours and rows.get(base):
                    print(f"    ours / {base}: {ours / rows[base]:.2f}x")


def bench_pair(label, fused, unfused, device, args, results, **shape):
    """Fused vs unfused torch path, both forward + backward."""
    rows = {}
    for name, fn in (("fused (ours)", fused), ("torch unfused", unfused)):
        sec, peak = timed(fn, device, args.warmup, args.reps)
        rows[name] = sec
        results.append(
            dict(kernel=label, method=name, ms=sec * 1e3, peak_mib=peak / 2**20, **shape)
        )
        print(f"  {label:14s} {name:14s}: {sec * 1e3:8.3f} ms  peak {peak / 2**20:8.1f} MiB")
    print(f"    speed-up: {rows['torch unfused'] / rows['fused (ours)']:.2f}x  {shape}")


def bench_softmax(args, device, dtype, results):
    b, h, s = args.softmax_shape
    lo, hi = glm_bounds(b, s, device)
    x = torch.randn(b, h, s, s, device=device, dtype=dtype, requires_grad=True)

    def run(fn):
        def go():
            y = fn(x, lo, hi, 0.125)
            y.backward(torch.ones_like(y))
            x.grad = None

        return go

    kernels.set_backend("triton")
    bench_pair(
        "masked softmax",
        run(kernels.masked_softmax),
        run(reference.masked_softmax_reference),
        device,
        args,
        results,
        batch=b,
        heads=h,
        seq=s,
        dtype=str(dtype),
    )


def bench_embedding(args, device, dtype, results):
    b, s, hidden, vocab = args.embedding_shape
    tokens = torch.randint(0, vocab, (b, s), device=device)
    sep = int(0.8 * s)
    pos = torch.stack([torch.arange(s).clamp(max=sep), torch.arange(s).sub(sep).clamp(min=0)]).to(
        device
    )
    pos = pos.expand(b, 2, s).contiguous()
    tables = [
        torch.randn(n, hidden, device=device, dtype=dtype, requires_grad=True)
        for n in (vocab, s + 1, s + 1)
    ]

    def run(fn):
        def go():
            out = fn(tokens, pos, *tables)
            out.backward(torch.ones_like(out))
            for t in tables:
                t.grad = None

        return go

    bench_pair(
        "2d embedding",
        run(kernels.embedding_2d),
        run(reference.embedding_2d_reference),
        device,
        args,
        results,
        batch=b,
        seq=s,
        hidden=hidden,
        vocab=vocab,
        dtype=str(dtype),
    )


def bench_rotary(args, device, dtype, results):
    b, s, heads, d = args.rotary_shape
    qkv = torch.randn(b, s, 3 * heads * d, device=device, dtype=dtype, requires_grad=True)
    pos = (
        torch.stack([torch.arange(s), torch.arange(s) % 64]).to(device).expand(b, 2, s).contiguous()
    )

    def run(fn):
        def go():
            q, k, _ = qkv.view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4)
            rq, rk = fn(q, k)
            (rq.sum() + rk.sum()).backward()
            qkv.grad = None

        return go

    bench_pair(
        "2d rotary",
        run(lambda q, k: kernels.rotary_2d(q, k, pos)),
        run(
            lambda q, k: (
                reference.rotary_2d_reference(q, pos),
                reference.rotary_2d_reference(k, pos),
            )
        ),
        device,
        args,
        results,
        batch=b,
        seq=s,
        heads=heads,
        head_dim=d,
        dtype=str(dtype),
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq for attention")
    p.add_argument("--hidden", type=int, default=2048, help="heads * head dim for attention")
    p.add_argument(
        "--softmax-shape", type=int, nargs=3, default=[4, 16, 2048], metavar=("B", "H", "S")
    )
    p.add_argument(
        "--embedding-shape",
        type=int,
        nargs=4,
        default=[8, 1024, 2048, 50304],
        metavar=("B", "S", "HIDDEN", "VOCAB"),
    )
    p.add_argument(
        "--rotary-shape", type=int, nargs=4, default=[8, 1024, 32, 64], metavar=("B", "S", "H", "D")
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=["attention", "softmax", "embedding", "rotary"],
        default=["attention", "softmax", "embedding", "rotary"],
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes, one repetition: checks the script runs"
    )
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        args.seq, args.head_dim, args.tokens, args.hidden = [48], [16], 96, 32
        args.softmax_shape, args.embedding_shape, args.rotary_shape = (
            [1, 2, 40],
            [2, 24, 32, 50],
            [1, 12, 2, 16],
        )
        args.warmup, args.reps = 0, 1
    elif device.type != "cuda":
        raise SystemExit(
            "benchmarks/attention.py measures GPU kernels; on the CPU only --smoke runs"
        )
    kernels.set_backend("triton")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device: {name}; dtype {dtype}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}"
    )
    results = []
    for part in args.only:
        print(f"{part}:")
        globals()[f"bench_{part}"](args, device, dtype, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(device=name, date=time.strftime("%Y-%m-%d"), results=results), f, indent=1
            )
    return results


if __name__ == "__main__":
    main()
