"""``glm-pretrain --dry-run``: one CPU process stands in for every rank of a job, before a cluster is rented.

The job's own flags are checked exactly as a real start checks them (layout, batch, schedule),
then, for each impersonated rank:

- torch's ``fake`` process-group backend plays the whole world (``--world-size``), so the
  parallel state builds every TP, PP, DP and embedding group a real start builds;
- the rank's pipeline chunks are built on the meta device, as training builds them, and made
  real as fake tensors (``FakeTensorMode``): shapes, dtypes and devices, no memory and no data;
- one training step runs through the real pipeline schedule: forward, loss and backward of
  every micro-batch, the point-to-point and tensor-parallel traffic, the tied embedding's;
  Triton kernels run their Python side (every tensor they allocate), their launches skipped;
- ``AllocationTracker`` (a dispatch mode, as torch's ``MemTracker``) traces every tensor the step
  allocates and frees: the device peak is measured from those, not from glm-plan's formulas;
  the collectives are counted per group (``Traffic``).

DeepSpeed cannot run on fake tensors (it flattens and copies real buffers), so its part is
DeepSpeed's partitioning arithmetic (``training/zero_states.py``): the optimizer state, the
ZeRO-2/3 gradient and weight partitions, and the data-parallel traffic. The report says which
figures are traced and which are arithmetic. Nothing reads the data (the tokenizer, or
``--vocab-size``, sets the vocabulary), and no weight is ever allocated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_glm.flags import read_flags, setting
from megatron_glm.kernels.dispatch import choosing_as_if_on

logger = logging.getLogger(__name__)

GiB = 2**30


@dataclass(kw_only=True)
class DryRunConfig:
    """The dry run's own flags (everything else is the real job's)."""

    dry_run: bool = setting(
        False,
        "check the job in one CPU process on fake tensors and report each rank's memory and traffic; "
        "trains nothing, reads no data",
    )
    world_size: int | None = setting(
        None, "the job's number of ranks (GPUs), for --dry-run", metavar="N"
    )
    dry_run_ranks: tuple[int, ...] | None = setting(
        None,
        "global ranks to impersonate (default: TP rank 0 of data-parallel rank 0 on the first, the second "
        "(the busiest middle one) and the last pipeline stage)",
    )
    gpu_memory: float | None = setting(
        None,
        "GiB of memory per GPU: the dry run fails, as the real start would, on a rank that needs more",
        metavar="GIB",
    )
    vocab_size: int | None = setting(
        None,
        "the tokenizer's vocabulary (special tokens included) where its files are not at hand; padded "
        "as training pads it",
    )
    dry_run_device: str = setting(
        "cuda",
        "the device the job will run on (the kernels and memory accounting follow it)",
        choices=("cuda", "cpu"),
    )

    def problems(self) -> list[str]:
        found = []
        if self.world_size is None or self.world_size < 1:
            found.append("--dry-run needs --world-size N, the job's number of ranks")
        if self.vocab_size is not None and self.vocab_size < 1:
            found.append(f"--vocab-size must be positive, got {self.vocab_size}")
        if self.gpu_memory is not None and self.gpu_memory <= 0:
            found.append(f"--gpu-memory must be positive, got {self.gpu_memory}")
        return found


def dry_run_config(args) -> DryRunConfig:
    return read_flags(DryRunConfig, args)


def impersonated_ranks(tp: int, pp: int, dp: int, given=None) -> list[int]:
    """The ranks to stand in for: ``given``, or one of each pipeline role (the first stage, the busiest
    middle one, the last)."""
    world = tp * pp * dp
    if given:
        bad = [r for r in given if not 0 <= r < world]
        if bad:
            raise ValueError(
                f"--dry-run-ranks {bad} outside the world of {world} ranks (0..{world - 1})"
            )
        return sorted(set(given))
    # of the middle stages the first holds the most micro-batches in flight (1F1B warms up pp - stage - 1)
    stages = sorted({0, min(1, pp - 1), pp - 1})
    return [stage * dp * tp for stage in stages]  # (p * dp + d) * tp + t with d = t = 0


# -- traffic ---------------------------------------------------------------------------------------
class Traffic:
    """Bytes a rank hands to each group's collectives and sends per step (tp, pp, embedding, ...): the
    payload, before the algorithm (a ring all-reduce moves about twice it over the links)."""

    def __init__(self, groups: dict):
        self.by_group: dict[str, int] = {}
        self.names = {id(g): name for name, g in groups.items()}

    def name(self, group) -> str:
        if isinstance(group, str):
            return group
        return "world" if group is None else self.names.get(id(group), "other")

    def add(self, group, nbytes: int) -> None:
        key = self.name(group)
        self.by_group[key] = self.by_group.get(key, 0) + nbytes

    @contextlib.contextmanager
    def counting(self):
        """Wrap the ``torch.distributed`` calls the model, the schedule and the tied embedding make."""

        def size(t) -> int:
            return t.numel() * t.element_size()

        def wrap(name, measure):
            real = getattr(dist, name)

            def counted(*args, **kwargs):
                group, nbytes = measure(*args, **kwargs)
                self.add(group, nbytes)
                return real(*args, **kwargs)

            return real, counted

        def pp_group():
            from megatron_glm.parallel import state

            return state.get_pipeline_model_parallel_group()

        measures = {
            "all_reduce": lambda t, *a, group=None, **k: (group, size(t)),
            # a broadcast sends from its source only
            "broadcast": lambda t, src, group=None, **k: (
                group,
                size(t) if src == dist.get_rank() else 0,
            ),
            "all_gather": lambda out, t, group=None, **k: (group, size(t)),
            "all_gather_into_tensor": lambda out, t, group=None, **k: (group, size(t)),
            "reduce_scatter": lambda out, parts, *a, group=None, **k: (
                group,
                sum(size(p) for p in parts),
            ),
            "reduce_scatter_tensor": lambda out, t, *a, group=None, **k: (group, size(t)),
            # point to point: the tied embedding's gradient goes first stage <- last stage
            "send": lambda t, dst, group=None, **k: (group or "embedding", size(t)),
            "batch_isend_irecv": lambda ops: (
                pp_group(),
                sum(size(op.tensor) for op in ops if op.op is dist.isend),
            ),
        }
        saved = {}
        for name, measure in measures.items():
            real, counted = wrap(name, measure)
            saved[name] = real
            setattr(dist, name, counted)
        try:
            yield self
        finally:
            for name, real in saved.items():
                setattr(dist, name, real)


@contextlib.contextmanager
def triton_launches_skipped():
    """Triton kernels' Python side runs (their allocations are the real ones); the launch itself does
    nothing, as there is no data. Without Triton the kernels' torch references run instead."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield False
        return
    real = JITFunction.run
    JITFunction.run = lambda self, *a, **k: None
    try:
        yield True
    finally:
        JITFunction.run = real


# -- one rank --------------------------------------------------------------------------------------
@dataclass
class RankReport:
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    layers: int
    parameters: int  # elements this rank holds (its TP x PP shard)
    # bytes on the device: weights in the training dtype (ZeRO-3: its partition and a gathered bucket)
    weights: int
    gradients: int
    optimizer: int  # DeepSpeed's fp32 master, Adam moments and buffers (arithmetic)
    setup_host: int  # peak host bytes while the rank builds its weights
    setup_device: int  # peak device bytes while the weights arrive and are cast
    static: int  # model states: weights, gradients, optimizer
    activations_peak: int  # traced: the step's peak above the weights and gradients
    # device peak of the step: the model states and the larger of activations and the optimizer step
    peak: int
    # bytes per group per step (tp, pp, embedding: counted; dp: arithmetic)
    traffic: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fake_batches(job, micro_batches: int, device):
    """Micro-batches in the batch contract's shapes and dtypes (values never matter on fake tensors)."""
    b, s = job.training.micro_batch_size, job.data.seq_length
    long = dict(dtype=torch.long, device=device)
    return [
        {
            "tokens": torch.zeros(b, s, **long),
            "labels": torch.zeros(b, s, **long),
            "loss_mask": torch.ones(b, s, device=device),
            "position_ids": torch.zeros(b, 2, s, **long),
            "attn_lo": torch.zeros(b, s, dtype=torch.int32, device=device),
            "attn_hi": torch.ones(b, s, dtype=torch.int32, device=device),
        }
        for _ in range(micro_batches)
    ]


def _one_step(chunks, tied, batches, vpp: int, shape, dtype, drop_grads: bool):
    """Forward and backward of every micro-batch through the real schedule, as ``StepRunner`` runs them,
    without the engine (its optimizer step is arithmetic here)."""
    from megatron_glm.parallel import state
    from megatron_glm.parallel.pipeline import backward_from, get_schedule

    pp = state.get_pipeline_model_parallel_world_size()
    schedule = get_schedule(pp, vpp)
    m = len(batches)
    total_calls, calls = m * len(chunks), [0]
    if drop_grads:  # ZeRO-2/3: each gradient goes to its bucket and on to its owner as it is made
        for chunk in chunks:
            for p in chunk.parameters():
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))

    def forward_step(chunk, k, hidden):
        b = batches[k]
        out = chunk(
            b["tokens"], b["position_ids"], b["attn_lo"], b["attn_hi"], hidden_states=hidden
        )
        if not chunk.post_process:
            return out
        return chunk.loss(out, b["labels"], b["loss_mask"])[0]

    def backward_step(chunk, hidden, out, out_grad):
        calls[0] += 1
        if out_grad is None:
            (out / m).backward()
        else:
            backward_from(out, out_grad)
            if calls[0] == total_calls and tied.active and tied.first_chunk is not None:
                tied.recv_grad_into(tied.first_chunk.output_weight())
        return hidden.grad if hidden is not None else None

    schedule(forward_step, backward_step, chunks, m, shape=shape, dtype=dtype, forward_only=False)
    tied.send_grad()
    tied.broadcast_weight()


def _meta_chunks(job, model_cfg, layout, device_kind: str):
    """This rank's chunks on the meta device, planned as training plans them; and the elements of the
    largest full tensor and of the largest shard (what the build and the cast hold at once)."""
    from megatron_glm.model.parallelize import (
        apply_ac,
        apply_layernorm_impl,
        apply_tp,
        build_chunks,
        partition_of,
    )

    par, impl = job.parallel, job.settings.implementation
    attention = impl.attention_impl
    if attention == "auto":
        attention = "flash" if device_kind == "cuda" else "sdpa"
    chunks = build_chunks(model_cfg, layout)
    largest_full = largest_shard = 0
    for chunk in chunks:
        chunk.set_attention_impl(attention)
        apply_tp(chunk, par.sequence_parallel, layout.tp_rank, layout.tp)
        apply_ac(chunk, *par.recompute)
        apply_layernorm_impl(chunk, impl.layernorm_impl)
        for name, p in chunk.named_parameters():
            split = partition_of(chunk.full_name(name), model_cfg.geglu)
            largest_full = max(largest_full, p.numel() * (layout.tp if split else 1))
            largest_shard = max(largest_shard, p.numel())
    return chunks, largest_full, largest_shard


def _traced_step(job, model_cfg, chunks, dtype, vpp: int, device_kind: str) -> dict:
    """The chunks made real as fake tensors, then one step, traced and counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megatron_glm.parallel import state
    from megatron_glm.parallel.pipeline_stage import TiedEmbedding
    from megatron_glm.parallel.tensor_parallel import materialize

    par, train = job.parallel, job.training
    tp, dp = state.get_tensor_model_parallel_world_size(), state.get_data_parallel_world_size()
    # fake tensors live on the CPU (autograd cannot run fake CUDA ones on a CPU build of torch); the
    # kernels and the attention choose as they would on the job's device
    cpu = torch.device("cpu")
    traffic = Traffic(dict(state._require()["groups"]))
    with (
        FakeTensorMode(allow_non_fake_inputs=False),
        choosing_as_if_on(device_kind),
        triton_launches_skipped() as triton,
        traffic.counting(),
    ):
        for chunk in chunks:  # the weights in the training dtype, as the engine casts them
            materialize(chunk, lambda name, meta: torch.empty(meta.shape, dtype=dtype, device=cpu))
        tied = TiedEmbedding(chunks, dtype)
        batches = _fake_batches(job, job.global_batch_size // (train.micro_batch_size * dp), cpu)
        seq = job.data.seq_length // tp if par.sequence_parallel else job.data.seq_length
        tracker = AllocationTracker()
        resident = [p for c in chunks for p in c.parameters()]
        if tied.active and tied.last_chunk is not None:
            resident.append(tied.last_chunk.tied_weight_copy)
        for p in resident:
            tracker.track(p)
            # below ZeRO-2 the step's gradients stay whole until the optimizer step: made up front, they
            # are model states, and the rest of the trace is activations and temporaries
            if par.zero_stage < 2:
                p.grad = torch.zeros_like(p)
                tracker.track(p.grad)
        static = tracker.live
        with tracker:
            shape = (train.micro_batch_size, seq, model_cfg.hidden_size)
            _one_step(chunks, tied, batches, vpp, shape, dtype, drop_grads=par.zero_stage >= 2)
    return {
        "activations": max(tracker.peak - static, 0),
        "resident": sum(p.numel() for p in resident),  # the weights and the tied copy
        "traffic": traffic.by_group,
        "triton": triton,
    }


def impersonate(job, model_cfg, dry: DryRunConfig, rank: int) -> RankReport:
    """Stand in for global ``rank`` of the job: build its chunks on fake tensors and run one step."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_glm.model.parallelize import RankLayout
    from megatron_glm.parallel import state
    from megatron_glm.training.zero_states import BYTES, model_states, setup_host_bytes

    par, precision, device_kind = job.parallel, job.training.precision, dry.dry_run_device
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dry.world_size)
    try:
        state.initialize_model_parallel(
            tp=par.tensor_model_parallel_size,
            pp=par.pipeline_model_parallel_size,
            num_attention_heads=model_cfg.num_attention_heads,
            hidden_size=model_cfg.hidden_size,
            vocab_size=model_cfg.vocab_size,
        )
        dp = state.get_data_parallel_world_size()
        vpp = par.virtual_stages(model_cfg.num_layers)
        layout = RankLayout.from_state(vpp, par.layer_counts(model_cfg.num_layers))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        chunks, largest_full, largest_shard = _meta_chunks(job, model_cfg, layout, device_kind)
        params = sum(p.numel() for c in chunks for p in c.parameters())
        traced = _traced_step(job, model_cfg, chunks, dtype, vpp, device_kind)
        notes = ["optimizer states and the optimizer step: DeepSpeed's partitioning arithmetic"]
        if device_kind == "cuda" and not traced["triton"]:
            notes.append("Triton is not installed here: the kernels' torch references were traced")

        # model states: traced where the step made them, DeepSpeed's arithmetic where DeepSpeed holds them
        e = BYTES[precision]
        states = model_states(params, precision, par.zero_stage, dp, par.cpu_offload)
        weights = gradients = e * traced["resident"]
        if par.zero_stage >= 2:
            gradients = states["gradients"]
        if par.zero_stage == 3:
            weights = states["weights"]
            notes.append(
                "ZeRO-3: the step was traced with the rank's whole shard; its weights are counted as "
                "DeepSpeed's partition plus one gathered bucket (arithmetic)"
            )
        optimizer = states["optimizer"] + states["buffers"]
        static = weights + gradients + optimizer
        # the optimizer step's temporary: the largest tensor it updates (the flat partition under ZeRO)
        step = 0 if par.cpu_offload else 4 * (-(-params // dp) if par.zero_stage else params)
        traffic = dict(traced["traffic"])
        if dp > 1:
            traffic["dp"] = _data_parallel_bytes(params, e, par.zero_stage)
            notes.append(
                "dp traffic: DeepSpeed's gradient reduction and parameter gathers (arithmetic)"
            )
        notes.append(
            "set-up: the build's own count (its fp32 shard, or ZeRO-3 partition, and one full tensor at a "
            "time on the host; the fp32 shard and the largest cast on the device)"
        )
        shard_fp32 = 4 * (-(-params // dp) if par.zero_stage == 3 else params)
        return RankReport(
            rank=rank,
            tp_rank=state.get_tensor_model_parallel_rank(),
            pp_rank=state.get_pipeline_model_parallel_rank(),
            dp_rank=state.get_data_parallel_rank(),
            layers=sum(len(r) for r in layout.chunk_layers(model_cfg.num_layers)),
            parameters=params,
            weights=weights,
            gradients=gradients,
            optimizer=optimizer,
            setup_host=setup_host_bytes(
                {"embedding": 0, "other": params, "largest_full": largest_full},
                dp if par.zero_stage == 3 else 0,
                device_kind,
            ),
            setup_device=shard_fp32 + e * largest_shard if device_kind == "cuda" else 0,
            static=static,
            activations_peak=traced["activations"],
            peak=static + max(traced["activations"], step),
            traffic=dict(sorted(traffic.items())),
            notes=notes,
        )
    finally:
        state.destroy_model_parallel()
        dist.destroy_process_group()


def _data_parallel_bytes(params: int, e: int, zero: int) -> int:
    """Per step: the gradients reduced once; with ZeRO the updated partitions gathered back (ZeRO-3 gathers the
    weights for the forward and again for the backward instead)."""
    if zero == 0:
        return e * params
    if zero == 3:
        return 3 * e * params
    return 2 * e * params


class AllocationTracker(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, from every op's outputs (fake tensors included).

    A storage counts from the op that made it until Python drops it (a weak reference's callback);
    views share their base's storage and count once. ``MemTracker`` does the same per module but
    refuses a module called twice, which every pipeline schedule does.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        self._sizes[key] = size = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


# -- the whole job ---------------------------------------------------------------------------------
def run(job, dry: DryRunConfig) -> list[RankReport]:
    """Every impersonated rank's report (the job's flags already checked for ``dry.world_size`` ranks)."""
    from megatron_glm.data.tokenizer import GLMTokenizer, pad_vocab

    par = job.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    vocab = dry.vocab_size or GLMTokenizer(job.settings.tokenizer.resolved()).vocab_size
    model_cfg = job.model_config(pad_vocab(vocab, tp, par.make_vocab_size_divisible_by))
    model_cfg.validate(job.data.seq_length)
    dp = dry.world_size // (tp * pp)
    reports = []
    for rank in impersonated_ranks(tp, pp, dp, dry.dry_run_ranks):
        logger.info(f"dry run: impersonating rank {rank} of {dry.world_size}")
        reports.append(impersonate(job, model_cfg, dry, rank))
    return reports


def table(reports: list[RankReport], gpu_memory: float | None) -> str:
    """The per-rank report as aligned text, GiB (traffic in MiB per step)."""

    def gib(n: int) -> str:
        return f"{n / GiB:.2f}"

    groups = sorted({g for r in reports for g in r.traffic})
    head = [
        "rank",
        "tp/pp/dp",
        "layers",
        "params",
        "weights",
        "grads",
        "optim",
        "setup host",
        "setup dev",
        "static",
        "act. peak",
        "peak",
    ] + [f"{g} MiB" for g in groups]
    rows = [head]
    for r in reports:
        rows.append(
            [
                str(r.rank),
                f"{r.tp_rank}/{r.pp_rank}/{r.dp_rank}",
                str(r.layers),
                _count(r.parameters),
            ]
            + [
                gib(x)
                for x in (
                    r.weights,
                    r.gradients,
                    r.optimizer,
                    r.setup_host,
                    r.setup_device,
                    r.static,
                    r.activations_peak,
                    r.peak,
                )
            ]
            + [f"{r.traffic.get(g, 0) / 2**20:.1f}" for g in groups]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    notes = sorted({n for r in reports for n in r.notes})
    if gpu_memory:
        notes.insert(0, f"--gpu-memory {gpu_memory:g} GiB per device")
    return "\n".join(
        lines + ["memory in GiB, traffic in MiB per step, per rank; " + "; ".join(notes)]
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def over_budget(reports: list[RankReport], gpu_memory: float | None) -> str | None:
    """The error a real start would end with, for the first rank that needs more than ``gpu_memory`` GiB."""
    if not gpu_memory:
        return None
    for r in reports:
        need = max(r.peak, r.setup_device)
        if need > gpu_memory * GiB:
            return (
                f"rank {r.rank} (pipeline stage {r.pp_rank}) needs {need / GiB:.2f} GiB of device memory, "
                f"more than --gpu-memory {gpu_memory:g}: it would run out of memory. Use more tensor or "
                "pipeline parallelism, a higher --zero-stage, --recompute-granularity full, or a smaller "
                "--micro-batch-size (glm-plan searches these)"
            )
    return None


def execute(args, quiet: bool = False) -> dict:
    """glm-pretrain --dry-run: check the job, impersonate its ranks, print (unless ``quiet``) and save the
    report; ``ValueError`` for what a real start would fail on."""
    from megatron_glm.training.config import from_args

    dry = dry_run_config(args)
    problems = dry.problems()
    if problems:
        raise ValueError("; ".join(problems))
    job = from_args(args, world_size=dry.world_size, elsewhere=dry.dry_run_device)
    reports = run(job, dry)
    if not quiet:
        print(table(reports, dry.gpu_memory))
    if job.log_dir:
        os.makedirs(job.log_dir, exist_ok=True)
        path = os.path.join(job.log_dir, "dry_run.json")
        with open(path, "w") as f:
            json.dump(
                {"world_size": dry.world_size, "ranks": [r.to_dict() for r in reports]}, f, indent=1
            )
        logger.info(f"dry run: report written to {path}")
    failure = over_budget(reports, dry.gpu_memory)
    if failure:
        raise ValueError(failure)
    return {"exit_code": 0, "dry_run": [r.to_dict() for r in reports]}
