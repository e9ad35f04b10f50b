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
    from megatron_glm.convert.writers import write_megatron_glm
    from megatron_glm.model.glm import GLMModel

    cfg = ModelConfig(**CFG)
    converted = GLMModel(
        cfg, seed=SEED + 1
    ).state_dict()  # not what SEED initialises: the file's values must win
    write_megatron_glm(str(tmp_path / "converted"), converted, cfg, {}, tp=2, pp=2)
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
