"""Candidate TP x PP x DP layouts for a cluster, their cost, and their ranking.

Each candidate gets the per-GPU memory of ``memory.estimate`` and a step-time model:

- compute: Megatron's training FLOPs (Narayanan et al. 2021) plus what recomputation replays
  (one more forward of everything with ``full``; the attention core with ``selective``),
  shared over every GPU, at ``efficiency`` of the peak;
- pipeline bubble: ``(p - 1) / (v m)`` of the compute (Narayanan et al. 2021);
- communication, counted as exposed (not overlapped): per GPU, ring volumes of TP's four
  all-reduces (or all-gather + reduce-scatter with SP) per layer and micro-batch over the
  node's links, pipeline sends between stages, and the data-parallel gradient reduction
  (plus ZeRO-3's parameter gathers) over the slowest link the group spans.

The model ranks layouts; it does not promise their absolute speed.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_glm.plan.memory import BYTES, Layout, StageMemory, Workload, estimate

GiB = 2**30


@dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    peak_tflops: float = 989.0  # dense bf16, H100 SXM (NVIDIA data sheet)
    intra_node_gbps: float = 300.0  # GB/s per GPU within a node (NVLink)
    inter_node_gbps: float = 25.0  # GB/s per GPU between nodes (a 200 Gb/s NIC per GPU)
    efficiency: float = 0.5  # the fraction of peak the matmuls reach
    reserve_gib: float = 2.0  # CUDA context, allocator caching, fragmentation

    def __post_init__(self):
        flag = {
            "nodes": "--nodes",
            "gpus_per_node": "--gpus-per-node",
            "gpu_memory_gib": "--gpu-memory",
            "peak_tflops": "--peak-tflops",
            "intra_node_gbps": "--intra-node-bandwidth",
            "inter_node_gbps": "--inter-node-bandwidth",
            "efficiency": "--efficiency",
        }
        problems = [
            f"{f} {getattr(self, k)} must be positive"
            for k, f in flag.items()
            if not getattr(self, k) > 0 or getattr(self, k) == float("inf")
        ]  # NaN fails `> 0`
        if not 0 <= self.reserve_gib < float("inf"):
            problems.append(f"--reserve {self.reserve_gib} must be 0 or more")
        elif self.gpu_memory_gib > 0 and self.reserve_gib >= self.gpu_memory_gib:
            problems.append(
                f"--reserve {self.reserve_gib:g} GiB leaves nothing of --gpu-memory "
                f"{self.gpu_memory_gib:g}"
            )
        if self.efficiency > 1:
            problems.append(f"--efficiency {self.efficiency} is a fraction of the peak: at most 1")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Candidate:
    layout: Layout
    stages: list[StageMemory]
    bubble: float
    comm_bytes: dict  # per GPU per step: tp, pp, dp
    step_time: float  # seconds (model)
    fits: bool

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    tokens: int = 0  # per step

    @property
    def tokens_per_s(self) -> float:
        return 0.0 if self.step_time <= 0 else self.tokens / self.step_time


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def balanced_ends(num_layers: int, pp: int) -> tuple[int, int] | None:
    """The uneven split for a layer count that ``pp`` does not divide: the stages between the first and
    the last take ``ceil(L / pp)`` layers each, the first and last share the rest (the first the smaller
    half), as GLM-130B's 70 layers on 8 stages (8 + 6 x 9 + 8). None when that leaves an end empty."""
    if pp < 2 or num_layers % pp == 0:
        return None
    middle = -(-num_layers // pp)
    rest = num_layers - middle * (pp - 2)
    first = rest // 2
    if first < 1 or rest - first > middle:
        return None
    return first, rest - first


def candidates(
    w: Workload,
    cluster: Cluster,
    zero_stages=(0, 1, 2, 3),
    recompute=(None, "selective", "full"),
    micro_batches=(1, 2, 4, 8, 16),
) -> list[Layout]:
    """Every layout the implementation accepts (``validate_args``' rules) for this cluster."""
    cfg, world, out = w.cfg, cluster.world, []
    for tp in _divisors(cluster.gpus_per_node):  # TP stays inside a node
        if cfg.num_attention_heads % tp or world % tp:
            continue
        for pp in _divisors(world // tp):
            ends = balanced_ends(cfg.num_layers, pp)
            if cfg.num_layers % pp and ends is None:
                continue
            dp = world // (tp * pp)
            for b in micro_batches:
                if w.global_batch % (b * dp):
                    continue
                m = w.global_batch // (b * dp)
                vpps = [1] + [
                    v
                    for v in (2, 4)
                    if pp > 1 and ends is None and cfg.num_layers % (pp * v) == 0 and m % pp == 0
                ]
                for v in vpps:
                    for z in zero_stages:
                        if pp > 1 and z >= 2 or dp == 1 and z > 0:
                            continue
                        for r in recompute:
                            out.append(
                                Layout(
                                    tp=tp,
                                    pp=pp,
                                    dp=dp,
                                    vpp=v,
                                    micro_batch=b,
                                    zero=z,
                                    sequence_parallel=tp > 1 and w.seq_length % tp == 0,
                                    recompute=r,
                                    ends=ends,
                                )
                            )
    return out


def _ring(size: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``size`` bytes over ``n`` ranks."""
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * size


def evaluate(w: Workload, lay: Layout, cluster: Cluster) -> Candidate:
    from megatron_glm.training.metrics import flops_per_token

    cfg, e = w.cfg, BYTES[w.precision]
    stages = estimate(w, lay)
    m = lay.micro_batches(w.global_batch)
    tokens = w.global_batch * w.seq_length
    s, h, L = w.seq_length, cfg.hidden_size, cfg.num_layers
    flops = flops_per_token(L, h, s, cfg.vocab_size) * tokens
    if lay.recompute == "full":
        flops *= 4 / 3  # the forward again: backward is twice the forward
    elif lay.recompute == "selective":
        flops += 4 * L * s * h * tokens  # QK^T and PV again (Korthikanti et al.)
    compute = flops / cluster.world / (cluster.peak_tflops * 1e12 * cluster.efficiency)
    # the pipeline runs at its heaviest stage's pace: an uneven split costs its largest stage
    layers_here = max(lay.stage_layers(L))
    compute *= layers_here * lay.pp / L
    bubble = (lay.pp - 1) / (lay.vpp * m)

    act = lay.micro_batch * s * h * e  # one activation tensor of a micro-batch
    # two all-reduces per layer forward, two backward, and with full recompute the forward's two again
    reduces = 6 if lay.recompute == "full" else 4
    tp_bytes = reduces * layers_here * m * _ring(act, lay.tp)
    pp_bytes = (
        0 if lay.pp == 1 else 2 * m * lay.vpp * act / (lay.tp if lay.sequence_parallel else 1)
    )
    params = max(st.parameters for st in stages)
    dp_bytes = _ring(params * e, lay.dp) * (1.5 if lay.zero == 3 else 1.0)
    intra = cluster.intra_node_gbps * 1e9
    inter = cluster.inter_node_gbps * 1e9
    dp_link = intra if lay.tp * lay.pp * lay.dp <= cluster.gpus_per_node else inter
    pp_link = intra if lay.tp * lay.pp <= cluster.gpus_per_node else inter
    comm_time = tp_bytes / intra + pp_bytes / pp_link + dp_bytes / dp_link
    step = compute * (1 + bubble) + comm_time
    budget = (cluster.gpu_memory_gib - cluster.reserve_gib) * GiB
    return Candidate(
        lay,
        stages,
        bubble,
        {"tp": tp_bytes, "pp": pp_bytes, "dp": dp_bytes},
        step,
        max(st.peak for st in stages) <= budget,
        tokens,
    )


def rank(w: Workload, cluster: Cluster, **limits) -> list[Candidate]:
    """Every candidate, the fitting ones first, fastest first (then the smaller peak)."""
    found = [evaluate(w, lay, cluster) for lay in candidates(w, cluster, **limits)]
    return sorted(found, key=lambda c: (not c.fits, c.step_time if c.fits else c.peak, c.peak))


def flags(w: Workload, lay: Layout) -> list[str]:
    """glm-pretrain's flags for a layout (the model flags come from the user's own command)."""
    out = [
        "--tensor-model-parallel-size",
        str(lay.tp),
        "--pipeline-model-parallel-size",
        str(lay.pp),
        "--micro-batch-size",
        str(lay.micro_batch),
        "--global-batch-size",
        str(w.global_batch),
        "--seq-length",
        str(w.seq_length),
        "--zero-stage",
        str(lay.zero),
    ]
    if lay.vpp > 1:
        out += [
            "--num-layers-per-virtual-pipeline-stage",
            str(w.cfg.num_layers // (lay.pp * lay.vpp)),
        ]
    if lay.ends:
        out += [
            "--decoder-first-pipeline-num-layers",
            str(lay.ends[0]),
            "--decoder-last-pipeline-num-layers",
            str(lay.ends[1]),
        ]
    if lay.sequence_parallel:
        out.append("--sequence-parallel")
    if lay.recompute:
        out += ["--recompute-granularity", lay.recompute]
    if w.precision != "fp32":
        out.append(f"--{w.precision}")
    if w.attention != "flash":
        out += ["--attention-impl", w.attention]
    return out
