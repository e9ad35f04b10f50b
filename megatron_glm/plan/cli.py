"""glm-plan: which TP x PP x DP layout to train a GLM with on a given cluster, and its flags.

    glm-plan --preset glm-10b --seq-length 1024 --global-batch-size 1024 --nodes 4 --gpus-per-node 8 --gpu-memory 80

prints the best layouts (per-GPU memory by term, pipeline bubble, communication per step, a
modelled step time) and the glm-pretrain flags of the best. Exit status 0 when a layout fits,
2 when none does (with the memory short and the smallest cluster that fits).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from megatron_glm.config import ModelConfig, add_model_flags, model_from_flags
from megatron_glm.plan.memory import ATTENTION, BYTES, Workload
from megatron_glm.plan.search import Cluster, GiB, flags, rank

# the tokenizers of the published models: BERT WordPiece, GPT-2 BPE
PRESET_VOCAB = {"glm-2b": 50257, "glm-10b": 50257, "glm-130b": 150528}  # GLM-130B's IceTokenizer
DEFAULT_VOCAB = 30522


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="glm-plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group(
        "model (a preset, or sizes; sizes override the preset): glm-pretrain's flags"
    )
    add_model_flags(g)
    g.add_argument(
        "--vocab-size",
        type=int,
        help="the tokenizer's vocabulary (padded here as glm-pretrain pads it); "
        f"default {DEFAULT_VOCAB}, or {PRESET_VOCAB['glm-2b']} for glm-2b and glm-10b",
    )
    g = p.add_argument_group("training")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, required=True)
    g.add_argument("--precision", choices=sorted(BYTES), default="bf16")
    g.add_argument(
        "--attention-impl",
        choices=ATTENTION,
        default="flash",
        help="flash: ours on GPU; sdpa: the CPU default; eager: the reference path",
    )
    g.add_argument("--zero-stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    g.add_argument(
        "--recompute",
        nargs="+",
        default=["none", "selective", "full"],
        choices=["none", "selective", "full"],
    )
    g.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    g.add_argument(
        "--reserve",
        type=float,
        default=2.0,
        help="GiB per GPU kept for the CUDA context and the allocator's cache",
    )
    g.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    g.add_argument(
        "--efficiency", type=float, default=0.5, help="fraction of the peak the matmuls reach"
    )
    g.add_argument(
        "--intra-node-bandwidth", type=float, default=300.0, help="GB/s per GPU (NVLink)"
    )
    g.add_argument(
        "--inter-node-bandwidth", type=float, default=25.0, help="GB/s per GPU (network)"
    )
    g.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: the byte counts of a CPU run (dropout masks in the element size)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--top", type=int, default=5)
    g.add_argument("--json", action="store_true", help="the ranked layouts as JSON on stdout")
    g.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="K",
        help="dry-run the K best layouts (glm-pretrain --dry-run: one process, fake tensors; minutes for a "
        "100B model) and recommend the best that fits by the traced peak",
    )
    return p


def model_from_args(args) -> ModelConfig:
    """The model glm-pretrain would build from the same flags, with the tokenizer's vocabulary."""
    vocab = args.vocab_size or PRESET_VOCAB.get(args.preset, DEFAULT_VOCAB)
    cfg = model_from_flags(args, vocab, args.seq_length)
    cfg.validate(seq_length=args.seq_length)
    return cfg


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def describe(c) -> dict:
    lay, worst = c.layout, max(c.stages, key=lambda s: s.peak)
    return {
        "tp": lay.tp,
        "pp": lay.pp,
        "dp": lay.dp,
        "vpp": lay.vpp,
        # Megatron's uneven split: the first and last stages' layers (the others split the rest)
        "first_last_layers": list(lay.ends) if lay.ends else None,
        "micro_batch": lay.micro_batch,
        "zero": lay.zero,
        "sequence_parallel": lay.sequence_parallel,
        "recompute": lay.recompute,
        "fits": c.fits,
        "peak_bytes": c.peak,
        "worst_stage": worst.stage,
        "terms_bytes": {
            "weights": worst.weights,
            "gradients": worst.gradients,
            "optimizer": worst.optimizer,
            "activations": worst.activations,
            "transient": worst.transient,
        },
        "setup_host_bytes": max(s.setup_host for s in c.stages),
        "in_flight": worst.in_flight,
        "bubble": c.bubble,
        "comm_bytes_per_step": c.comm_bytes,
        "step_time_s": c.step_time,
        "tokens_per_s": c.tokens_per_s,
    }


def _table(ranked, top: int) -> str:
    head = (
        f"{'layout':<44} {'peak GiB':>8} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} {'trans':>7} "
        f"{'bubble':>6} {'comm GB':>8} {'step s':>8}"
    )
    rows = [head, "-" * len(head)]
    for c in ranked[:top]:
        st = max(c.stages, key=lambda s: s.peak)
        name = c.layout.label
        rows.append(
            f"{name:<44} {_gib(c.peak):>8} {_gib(st.weights):>8} {_gib(st.gradients):>7} "
            f"{_gib(st.optimizer):>7} {_gib(st.activations):>7} {_gib(st.transient):>7} "
            f"{c.bubble:>6.1%} {sum(c.comm_bytes.values()) / 1e9:>8.2f} {c.step_time:>8.3f}"
        )
    return "\n".join(rows)


def smallest_fitting_nodes(w: Workload, cluster: Cluster, limit: int = 4096, **kw) -> int | None:
    """The fewest nodes (doubling) on which some layout fits, or None up to ``limit``."""
    nodes = cluster.nodes * 2
    while nodes <= limit:
        if any(c.fits for c in rank(w, replace(cluster, nodes=nodes), **kw)):
            return nodes
        nodes *= 2
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if min(args.micro_batch_sizes) < 1 or args.top < 1 or args.verify < 0:
            raise ValueError(
                "--micro-batch-sizes and --top must be positive, --verify not negative"
            )
        cfg = model_from_args(args)
        cluster = Cluster(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu_memory_gib=args.gpu_memory,
            peak_tflops=args.peak_tflops,
            intra_node_gbps=args.intra_node_bandwidth,
            inter_node_gbps=args.inter_node_bandwidth,
            efficiency=args.efficiency,
            reserve_gib=args.reserve,
        )
        w = Workload(
            cfg,
            args.seq_length,
            args.global_batch_size,
            args.precision,
            args.attention_impl,
            args.device,
        )
    except ValueError as e:
        print(f"glm-plan: error: {e}", file=sys.stderr)
        return 1
    limits = dict(
        zero_stages=tuple(args.zero_stages),
        micro_batches=tuple(args.micro_batch_sizes),
        recompute=tuple(None if r == "none" else r for r in args.recompute),
    )
    ranked = rank(w, cluster, **limits)
    if not ranked:
        print(
            f"glm-plan: error: no layout of {cluster.world} GPUs divides this model and batch: the global batch "
            f"{args.global_batch_size} must be a multiple of micro-batch x data-parallel size, TP must divide "
            f"{cfg.num_attention_heads} heads and PP {cfg.num_layers} layers",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps([describe(c) for c in ranked[: args.top]], indent=1))
    else:
        print(
            f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, vocab "
            f"{cfg.vocab_size}, seq {args.seq_length}, global batch {args.global_batch_size}, {args.precision}, "
            f"attention {args.attention_impl}; {cluster.nodes} x {cluster.gpus_per_node} GPUs of "
            f"{args.gpu_memory:g} GiB ({args.reserve:g} GiB kept free)\n"
        )
        print(_table(ranked, args.top))
    best = ranked[0]
    budget = (cluster.gpu_memory_gib - cluster.reserve_gib) * GiB
    if not best.fits:
        short = best.peak - budget
        more = smallest_fitting_nodes(w, cluster, **limits)
        print(
            f"\nglm-plan: no layout fits: the smallest needs {_gib(best.peak)} GiB per GPU, "
            f"{_gib(short)} GiB ({short / budget:.0%}) more than the {_gib(budget)} GiB available. "
            + (
                f"It fits on {more} nodes of this kind."
                if more
                else "No cluster of this kind up to 4096 nodes fits."
            )
            + " Or shorten --seq-length, or give GPUs with more memory.",
            file=sys.stderr,
        )
        return 2
    if args.verify:
        from megatron_glm.plan.verify import table, verify

        verified = verify(w, cluster, ranked, args.verify)
        print(
            "\ndry runs (glm-pretrain --dry-run) beside the estimates, per-GPU peak:\n"
            + table(verified)
        )
        fitting = [v.candidate for v in verified if v.fits]
        if not fitting:
            print(
                f"\nglm-plan: none of the {len(verified)} best layouts fits when dry-run: their traced peaks "
                "exceed the GPUs' memory. Verify more (--verify), give more nodes, or shorten --seq-length.",
                file=sys.stderr,
            )
            return 2
        best = fitting[0]
    if not args.json:
        host = max(s.setup_host for s in best.stages)
        print(
            f"\nhost memory per rank while it builds its weights: {_gib(host)} GiB (its fp32 shard, or with "
            "ZeRO-3 its partition as it is made, and one full tensor at a time)"
        )
        print(
            "\nbest layout, glm-pretrain flags (add the model, data and optimizer flags):\n  "
            + " ".join(flags(w, best.layout))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
