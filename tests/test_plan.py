"""glm-plan: its byte counts against what PyTorch holds, its peaks against measured glm-pretrain runs, its refusals.

- parameters: against the closed form of the GLM architecture (REFERENCE.md section 2), per stage;
- one layer's activations: against the bytes autograd actually saves (``saved_tensors_hooks``);
- whole runs: glm-pretrain ``--measure-memory`` (the CPU allocator's events from the profiler)
  in several layouts; the planner's peak for the worst rank must be within 15%;
- the CLI: the best layout's flags are accepted by glm-pretrain; a model that fits nowhere is
  refused with the shortfall and the cluster size that would fit.
"""

import glob
import json

import pytest
import torch

from megatron_glm.config import ModelConfig, preset
from megatron_glm.plan.cli import main as plan
from megatron_glm.plan.memory import (
    Layout,
    Workload,
    estimate,
    in_flight,
    layer_activations,
    stage_parameters,
)
from megatron_glm.plan.search import Cluster, rank
from tests.helpers import launch_pretrain


def closed_form_parameters(L, h, V, max_pos, ffn=None):
    """GLM (learned 2D positions, tied output): embeddings, two position tables, L layers, final LayerNorm."""
    f = ffn or 4 * h
    layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    return V * h + 2 * (max_pos + 1) * h + L * layer + 2 * h


def test_parameters_per_stage_add_up_to_the_closed_form():
    cfg = preset("glm-large", vocab_size=30592)
    total = closed_form_parameters(24, 1024, 30592, 512)
    assert sum(s["embedding"] + s["other"] for s in stage_parameters(cfg, 1, 1)) == total
    four = stage_parameters(cfg, 1, 4)
    layer = (total - 30592 * 1024 - 2 * 513 * 1024 - 2 * 1024) // 24
    assert [s["embedding"] + s["other"] for s in four] == [
        30592 * 1024 + 2 * 513 * 1024 + 6 * layer,
        6 * layer,
        6 * layer,
        6 * layer + 2 * 1024,
    ]
    # TP2: the split matrices and column-parallel biases halve; row-parallel biases and LayerNorms stay whole
    h, f = 1024, 4096
    halved = 3 * h * h + 3 * h + h * h + h * f + f + f * h
    whole = h + h + 4 * h
    two = stage_parameters(cfg, 2, 1)[0]
    assert two["embedding"] == 30592 * 1024 // 2
    assert two["other"] == 24 * (halved // 2 + whole) + 2 * 513 * 1024 + 2 * 1024


def test_an_uneven_split_holds_each_stages_own_layers():
    """GLM-130B's split, 8 + 6 x 9 + 8 layers: each stage's parameters and activations follow its layers."""
    cfg = preset("glm-large", num_layers=70, vocab_size=30592)
    total = closed_form_parameters(70, 1024, 30592, 512)
    layer = (total - 30592 * 1024 - 2 * 513 * 1024 - 2 * 1024) // 70
    counts = [8, 9, 9, 9, 9, 9, 9, 8]
    stages = stage_parameters(cfg, 1, 8, 1, counts)
    assert [s["embedding"] + s["other"] for s in stages] == [
        30592 * 1024 + 2 * 513 * 1024 + 8 * layer,
        *[9 * layer] * 6,
        8 * layer + 2 * 1024,
    ]
    w = Workload(cfg, seq_length=512, global_batch=64, precision="bf16")
    uneven = estimate(w, Layout(pp=8, dp=1, zero=0, ends=(8, 8)))
    per_layer = sum(layer_activations(w, Layout(pp=8)).values())
    assert [st.activations for st in uneven] == [
        st.in_flight * n * per_layer for st, n in zip(uneven, counts)
    ]


def test_glm_plan_splits_layers_a_pipeline_does_not_divide_and_glm_pretrain_takes_its_flags():
    from megatron_glm.plan.search import balanced_ends, candidates, evaluate, flags
    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.config import from_args

    assert (
        balanced_ends(70, 8) == (8, 8)
        and balanced_ends(70, 12) == (5, 5)
        and balanced_ends(7, 3) == (2, 2)
    )
    assert balanced_ends(64, 8) is None and balanced_ends(7, 2) == (3, 4)
    cfg = ModelConfig(num_layers=70, hidden_size=64, num_attention_heads=4, vocab_size=1024)
    w = Workload(cfg, seq_length=128, global_batch=64, precision="bf16")
    cluster = Cluster(nodes=1, gpus_per_node=8)
    found = [lay for lay in candidates(w, cluster) if lay.pp == 8]
    assert found and all(lay.ends == (8, 8) and lay.vpp == 1 for lay in found)
    lay = found[0]
    argv = [
        "--data-path",
        "x",
        "--train-iters",
        "1",
        "--num-layers",
        "70",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--device",
        "cpu",
        *flags(w, lay),
    ]
    job = from_args(build_parser().parse_args(argv), world_size=8)
    assert job.parallel.layer_counts(70) == [8, 9, 9, 9, 9, 9, 9, 8]
    # the pipeline runs at its heaviest stage's pace: 72 layers as 6 + 6 x 10 + 6 cost more than 8 x 9
    w72 = Workload(ModelConfig(**{**cfg.to_dict(), "num_layers": 72}), 128, 64, "bf16")
    even = Layout(**{**lay.__dict__, "ends": None})
    lopsided = Layout(**{**lay.__dict__, "ends": (6, 6)})
    assert lopsided.stage_layers(72) == [6, *[10] * 6, 6] and even.stage_layers(72) == [9] * 8
    assert evaluate(w72, lopsided, cluster).step_time > evaluate(w72, even, cluster).step_time


def saved_bytes(layer, x, *args):
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, *args)
    return sum(kept.values())


@pytest.mark.parametrize(
    "impl,dropout,dtype,variant",
    [
        ("sdpa", 0.0, "fp32", None),
        ("sdpa", 0.0, "fp32", "rotary_2d"),
        ("sdpa", 0.0, "fp32", "geglu"),
        ("sdpa", 0.0, "bf16", None),
        ("sdpa", 0.1, "fp32", None),
        ("eager", 0.0, "fp32", None),
        ("eager", 0.1, "fp32", None),
        ("flash", 0.0, "fp32", None),
        ("flash", 0.0, "fp32", "rotary_2d"),
    ],
)
def test_layer_activations_equal_what_autograd_saves(impl, dropout, dtype, variant, monkeypatch):
    from megatron_glm import kernels
    from megatron_glm.model.glm import TransformerLayer

    if impl == "flash":  # the Triton kernels themselves (attention and rotary), in the interpreter
        monkeypatch.setattr(kernels.dispatch, "_backend", "triton")
    b, s, h, a = (1, 32, 32, 2) if impl == "flash" else (2, 64, 64, 4)
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=h,
        num_attention_heads=a,
        vocab_size=128,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        geglu=variant == "geglu",
        position_embedding_type="rotary_2d" if variant == "rotary_2d" else "learned_2d",
    )
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    layer = TransformerLayer(cfg, 0).to(torch_dtype).train()
    layer.attention.core_attention.impl = impl
    x = torch.randn(b, s, h, dtype=torch_dtype, requires_grad=True)
    args = (
        torch.zeros(b, 2, s, dtype=torch.long),
        torch.zeros(b, s, dtype=torch.long),
        torch.full((b, s), s),
    )
    measured = saved_bytes(layer, x, *args)
    # flash: the GPU path's Triton kernels, run by the interpreter
    device = "cuda" if impl == "flash" else "cpu"
    estimated = sum(
        layer_activations(Workload(cfg, s, b, dtype, impl, device), Layout(micro_batch=b)).values()
    )
    assert estimated == pytest.approx(measured, rel=0.04)


def test_pipeline_in_flight_and_bubble():
    # 1F1B: stage r holds p - r micro-batches; interleaved: Megatron's warm-up plus one
    assert [in_flight(Layout(pp=4), 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight(Layout(pp=4), 2, r) for r in range(4)] == [2, 2, 2, 1]
    assert in_flight(Layout(pp=4, vpp=2), 8, 0) == 6 + 4 + 1
    # as many micro-batches as stages: all forwards first
    assert in_flight(Layout(pp=2, vpp=2), 2, 0) == 4
    cfg = preset("glm-large", vocab_size=30592)
    w = Workload(cfg, 512, 64)
    from megatron_glm.plan.search import evaluate

    assert evaluate(
        w, Layout(pp=4, dp=2, micro_batch=4, zero=1), Cluster()
    ).bubble == pytest.approx(3 / 8)
    assert evaluate(
        w, Layout(pp=4, dp=2, micro_batch=4, zero=1, vpp=2), Cluster()
    ).bubble == pytest.approx(3 / 16)


# -- whole runs: glm-pretrain --measure-memory ---------------------------------------------------
RUNS = {  # name: (processes, flags, Layout, precision)
    "one process": (1, [], Layout(zero=0), "fp32"),
    "full recompute": (
        1,
        ["--recompute-granularity", "full"],
        Layout(zero=0, recompute="full"),
        "fp32",
    ),
    "bf16": (1, ["--bf16"], Layout(zero=0), "bf16"),
    "TP2": (2, ["--tensor-model-parallel-size", "2"], Layout(tp=2, zero=0), "fp32"),
    "PP2": (2, ["--pipeline-model-parallel-size", "2"], Layout(pp=2, zero=0), "fp32"),
    "DP2 ZeRO-1": (2, ["--zero-stage", "1"], Layout(dp=2, zero=1), "fp32"),
    "DP2 ZeRO-3": (2, ["--zero-stage", "3"], Layout(dp=2, zero=3), "fp32"),
    "DP2 ZeRO-1 bf16": (2, ["--zero-stage", "1", "--bf16"], Layout(dp=2, zero=1), "bf16"),
}


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.slow
def test_estimated_peak_matches_measured_run(tmp_path, data, tokenizer, name):
    nproc, extra, layout, precision = RUNS[name]
    prefix, model = data
    micro, seq, hidden = 2, 128, 64
    argv = [
        "--data-path",
        prefix,
        "--tokenizer-model",
        model,
        "--num-layers",
        "4",
        "--hidden-size",
        str(hidden),
        "--num-attention-heads",
        "4",
        "--seq-length",
        str(seq),
        "--micro-batch-size",
        str(micro),
        "--global-batch-size",
        "8",
        "--train-iters",
        "2",
        "--lr",
        "1e-3",
        "--split",
        "100,0,0",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--log-dir",
        str(tmp_path),
        "--measure-memory",
        "--data-cache-path",
        str(tmp_path / "cache"),
        *extra,
    ]
    result = launch_pretrain(nproc, argv)
    assert result.returncode == 0, result.stderr[-5000:]
    reports = [json.load(open(f)) for f in glob.glob(str(tmp_path / "memory_rank*.json"))]
    assert len(reports) == nproc and all(r["device"] == "cpu" for r in reports)

    cfg = ModelConfig(
        num_layers=4,
        hidden_size=hidden,
        num_attention_heads=4,
        max_position_embeddings=seq,
        vocab_size=tokenizer.vocab_size,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    layout = Layout(**{**layout.__dict__, "micro_batch": micro})
    stages = estimate(Workload(cfg, seq, 8, precision, "sdpa", "cpu"), layout)
    for st in stages:
        measured = max(r["peak_bytes"] for r in reports if r["pp_rank"] == st.stage)
        assert st.peak == pytest.approx(measured, rel=0.10), (name, st.stage, measured, st.terms)


# -- the CLI ---------------------------------------------------------------------------------------
def test_best_layout_flags_are_accepted_by_glm_pretrain(capsys):
    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.config import from_args

    assert (
        plan(
            [
                "--preset",
                "glm-2b",
                "--seq-length",
                "1024",
                "--global-batch-size",
                "512",
                "--nodes",
                "2",
                "--gpus-per-node",
                "8",
                "--gpu-memory",
                "80",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    line = out.strip().splitlines()[-1].split()
    args = build_parser().parse_args(
        ["--preset", "glm-2b", "--data-path", "x", "--train-iters", "10", *line]
    )
    from_args(args, world_size=16)  # raises on a layout glm-pretrain would refuse
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    assert 16 % (tp * pp) == 0 and 32 % tp == 0 and 36 % pp == 0


def test_a_model_that_fits_nowhere_is_refused_with_the_shortfall(capsys):
    argv = [
        "--preset",
        "glm-10b",
        "--seq-length",
        "1024",
        "--global-batch-size",
        "8",
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        "--gpu-memory",
        "24",
        "--reserve",
        "0",
    ]
    assert plan(argv) == 2
    err = capsys.readouterr().err
    assert "no layout fits" in err and "more than the 24.00 GiB available" in err
    # the stated shortfall: at least the fp32 Adam moments of 10B parameters beyond 24 GiB
    needs = float(err.split("needs ")[1].split(" GiB")[0])
    assert needs > 10e9 * 8 / 2**30
    # and the node count it names does fit, while half of it does not
    nodes = int(err.split("fits on ")[1].split(" nodes")[0])
    from megatron_glm.plan.cli import build_parser, model_from_args

    args = build_parser().parse_args(argv)
    w = Workload(model_from_args(args), 1024, 8)
    cluster = Cluster(nodes=nodes, gpus_per_node=1, gpu_memory_gib=24, reserve_gib=0)
    assert any(c.fits for c in rank(w, cluster))
    assert not any(
        c.fits
        for c in rank(
            w, Cluster(nodes=nodes // 2, gpus_per_node=1, gpu_memory_gib=24, reserve_gib=0)
        )
    )


def test_impossible_model_is_a_named_error(capsys):
    assert (
        plan(
            [
                "--hidden-size",
                "100",
                "--num-attention-heads",
                "3",
                "--num-layers",
                "2",
                "--seq-length",
                "64",
                "--global-batch-size",
                "8",
            ]
        )
        == 1
    )
    assert "not divisible by --num-attention-heads" in capsys.readouterr().err
