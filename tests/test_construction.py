"""Each rank builds only its own shard: bitwise the one-process init's slice, in bounded host memory.

Four gloo processes at TP2 x PP2 build a model whose four full copies would not fit in the
budget the test sets; each rank's peak resident memory during construction (the kernel's VmHWM,
reset just before) must stay within its shard plus the largest full tensor plus a small
constant, and near glm-plan's estimate of it. The oracle for the weights is the one-process
GLMModel with the same seed, sliced by this test's own reading of the partition rules.
"""

import pytest
import torch

from tests.helpers import spawn

SEED = 1234
CFG = dict(
    num_layers=8,
    hidden_size=1024,
    num_attention_heads=16,
    vocab_size=8192,
    max_position_embeddings=512,
)
CONSTANT = 64 * 2**20  # interpreter, allocator slack, the meta model's bookkeeping


def full_bytes(cfg) -> int:
    from megatron_glm.model.glm import GLMModel

    with torch.device("meta"):
        return 4 * sum(p.numel() for p in GLMModel(cfg).parameters())


def expected_slice(name: str, full: torch.Tensor, r: int, tp: int) -> torch.Tensor:
    rows = lambda t: t.chunk(tp, 0)[r]  # noqa: E731
    if "query_key_value" in name:  # [Q; K; V], each split by heads
        return torch.cat([rows(part) for part in full.chunk(3, 0)])
    if "dense_h_to_4h" in name or name == "word_embeddings.weight":
        return rows(full)
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        return full.chunk(tp, 1)[r]
    return full


def construction_worker(rank, world, load_dir, reference_seed):
    from megatron_glm import checkpoint as ckpt
    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel
    from megatron_glm.model.parallelize import RankLayout, build_rank_model
    from megatron_glm.parallel import state
    from megatron_glm.plan.memory import setup_host_bytes, stage_parameters
    from megatron_glm.training.memory import host_memory, reset_host_peak

    state.initialize_model_parallel(tp=2, pp=2)
    cfg = ModelConfig(**CFG)
    layout = RankLayout.from_state()
    weights = None
    if load_dir:

        def weights(chunks):
            return ckpt.read_weights_only(
                load_dir, ckpt.resume_tag(load_dir), layout.pp_rank, layout.tp_rank, layout.tp
            )

    build_rank_model(
        ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, vocab_size=16), layout, SEED
    )
    # after a tiny build: the meta device's first use imports ~150 MB of libraries (sympy)
    assert reset_host_peak()
    before = host_memory()["rss_bytes"]
    chunks = build_rank_model(cfg, layout, SEED, weights=weights)
    peak = host_memory()["peak_rss_bytes"] - before
    params = {
        chunk.full_name(n): p.detach() for chunk in chunks for n, p in chunk.named_parameters()
    }
    shard = sum(4 * p.numel() for p in params.values())
    reference = GLMModel(cfg, seed=reference_seed).state_dict()
    largest = max(4 * t.numel() for t in reference.values())
    wrong = [
        n
        for n, p in params.items()
        if not torch.equal(p, expected_slice(n, reference[n], layout.tp_rank, 2))
    ]
    # glm-plan's figure for this rank
    planned = setup_host_bytes(stage_parameters(cfg, 2, 2)[layout.pp_rank])
    return {
        "peak": peak,
        "shard": shard,
        "largest": largest,
        "planned": planned,
        "names": sorted(params),
        "wrong": wrong,
        "coords": (layout.pp_rank, layout.tp_rank),
        "all_names": sorted(reference),
    }


def check(results, cfg_bytes):
    for r in results:
        bound = r["shard"] + r["largest"] + CONSTANT
        assert bound < cfg_bytes  # the budget: four full copies would exceed four times it
        assert r["peak"] <= bound, (
            f"rank {r['coords']}: set-up peak {r['peak'] / 2**20:.0f} MiB > {bound / 2**20:.0f}"
        )
        assert r["wrong"] == []
        assert abs(r["peak"] - r["planned"]) <= CONSTANT, (r["peak"], r["planned"])
    covered = {n for r in results if r["coords"][1] == 0 for n in r["names"]}
    assert covered == set(results[0]["all_names"])  # the stages together hold the whole model, once
    assert sum(len(r["names"]) for r in results if r["coords"][1] == 0) == len(covered)


@pytest.mark.slow
def test_tp2_pp2_ranks_initialise_only_their_shard_bitwise(tmp_path):
    from megatron_glm.config import ModelConfig

    check(spawn(construction_worker, 4, tmp_path, None, SEED), full_bytes(ModelConfig(**CFG)))


@pytest.mark.slow
def test_tp2_pp2_ranks_read_only_their_converted_shard(tmp_path):
    from megatron_glm.config import ModelConfig
    from megatron_glm.convert.sources import StateDict
    from megatron_glm.convert.writers import write_megatron_glm
    from megatron_glm.model.glm import GLMModel

    cfg = ModelConfig(**CFG)
    converted = GLMModel(
        cfg, seed=SEED + 1
    ).state_dict()  # not what SEED initialises: the file's values must win
    write_megatron_glm(str(tmp_path / "converted"), StateDict(converted, cfg), tp=2, pp=2)
    del converted
    check(
        spawn(construction_worker, 4, tmp_path / "out", str(tmp_path / "converted"), SEED + 1),
        full_bytes(cfg),
    )


@pytest.mark.parametrize(
    "layers,pre,post", [(range(0, 2), True, False), (range(2, 4), False, True)]
)
def test_a_chunk_built_alone_equals_the_whole_models_layers(layers, pre, post):
    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel

    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=2, vocab_size=64)
    whole = GLMModel(cfg, seed=5).state_dict()
    chunk = GLMModel(cfg, layers, pre_process=pre, post_process=post, seed=5)
    names = {chunk.full_name(n): p for n, p in chunk.state_dict().items()}
    assert ("word_embeddings.weight" in names) == pre and (
        "transformer.final_layernorm.weight" in names
    ) == post
    assert all(torch.equal(p, whole[n]) for n, p in names.items())


def zero3_construction_worker(rank, world, cfg_items):
    """glm-pretrain's build under --zero-stage 3 on DP ``world``: the set-up peak, and whether the gathered
    weights equal the one-process init's, tensor by tensor."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel
    from megatron_glm.model.parallelize import RankLayout, build_rank_model, count_parameters
    from megatron_glm.plan.memory import setup_host_bytes, stage_parameters
    from megatron_glm.training.arguments import build_parser
    from megatron_glm.training.config import from_args
    from megatron_glm.training.engine import init_distributed, zero3_partitioner
    from megatron_glm.training.memory import host_memory, reset_host_peak

    cfg = ModelConfig(**dict(cfg_items))
    argv = [
        "--data-path",
        "x",
        "--train-iters",
        "1",
        "--zero-stage",
        "3",
        "--micro-batch-size",
        "1",
    ]
    job = from_args(build_parser().parse_args(argv + ["--device", "cpu"]), world)
    init_distributed("cpu", 1, 1, cfg)
    layout = RankLayout.from_state()
    build_rank_model(
        ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, vocab_size=16), layout, SEED
    )  # the meta device's one-time imports, before the measurement
    partition = zero3_partitioner(job, 1, count_parameters(cfg, 1))
    assert reset_host_peak()
    before = host_memory()["rss_bytes"]
    (model,) = build_rank_model(cfg, layout, SEED, partition=partition)
    peak = host_memory()["peak_rss_bytes"] - before
    params = dict(model.named_parameters())
    partitioned = all(
        p.numel() == 0 and p.ds_tensor.numel() <= -(-p.ds_numel // world) for p in params.values()
    )
    shard = 4 * sum(p.ds_numel for p in params.values())
    reference = GLMModel(cfg, seed=SEED).state_dict()
    wrong = []
    for name, p in params.items():  # gathered one at a time
        with GatheredParameters([p]):
            if not torch.equal(p.data, reference[name]):
                wrong.append(name)
    counts = stage_parameters(cfg, 1, 1)[0]
    return {
        "peak": peak,
        "shard": shard,
        "largest": 4 * counts["largest_full"],
        "planned": setup_host_bytes(counts, world, "cpu"),
        "partitioned": partitioned,
        "wrong": wrong,
        "names": sorted(params) == sorted(reference),
    }


@pytest.mark.slow
def test_zero3_ranks_hold_only_their_partition_while_they_build(tmp_path):
    """glm-large on DP 2 with ZeRO-3: each parameter is partitioned as soon as it exists, so a rank's set-up peak
    is half its shard plus one full tensor (not the whole shard first), and the weights are the one-process
    init's, bitwise."""
    from megatron_glm.config import preset

    cfg = preset("glm-large", vocab_size=30592)
    results = spawn(zero3_construction_worker, 2, tmp_path, tuple(cfg.to_dict().items()))
    for r in results:
        assert r["partitioned"] and r["names"] and r["wrong"] == []
        bound = r["shard"] // 2 + r["largest"] + CONSTANT
        assert r["peak"] <= bound, (
            f"set-up peak {r['peak'] / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
        )
        assert r["peak"] < 0.75 * r["shard"]  # the whole shard never existed
        # glm-plan's figure bounds it: the partitions and the largest tensor (the embedding, made first, when the
        # partitions are few)
        assert r["peak"] - CONSTANT <= r["planned"] <= r["peak"] + r["largest"] + CONSTANT


def test_apex_layernorm_takes_the_same_parameters_before_they_are_made(monkeypatch):
    """--layernorm-impl apex swaps the LayerNorms on the meta model (so ZeRO-3 can partition what is built):
    the fused module holds the same parameter objects, so the weights and their parallel attributes match."""
    import sys
    import types

    from megatron_glm.config import ModelConfig
    from megatron_glm.model.parallelize import RankLayout, build_rank_model

    class FusedLayerNorm(torch.nn.LayerNorm):  # apex's class, as far as this code can tell
        pass

    apex = types.ModuleType("apex")
    apex.normalization = types.ModuleType("apex.normalization")
    apex.normalization.FusedLayerNorm = FusedLayerNorm
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.normalization", apex.normalization)
    cfg = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=32)
    layout = RankLayout(tp=1, pp=1)
    (plain,) = build_rank_model(cfg, layout, SEED)
    (fused,) = build_rank_model(cfg, layout, SEED, layernorm_impl="apex")
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m) is FusedLayerNorm for m in norms)
    plain_state, fused_state = plain.state_dict(), fused.state_dict()
    assert plain_state.keys() == fused_state.keys()
    assert all(torch.equal(plain_state[k], fused_state[k]) for k in plain_state)
    # the very parameters, so that attributes the parallel plan set (sequence_parallel, ...) stay with them
    from megatron_glm.model.parallelize import apply_layernorm_impl

    norm = torch.nn.LayerNorm(4)
    norm.weight.sequence_parallel = True
    holder = torch.nn.Sequential(norm)
    apply_layernorm_impl(holder, "apex")
    assert type(holder[0]) is FusedLayerNorm and holder[0].weight is norm.weight
    assert holder[0].weight.sequence_parallel
