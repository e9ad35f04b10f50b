"""Tensor (and sequence) parallelism equals one process: real processes over gloo, no mocks."""

import copy

import numpy as np
import pytest
import torch

from tests.helpers import spawn

VOCAB, SEQ = 256, 64
# name: (sequence parallel, recompute (granularity, method, layers), position embedding, geglu)
CASES = {
    "plain": (False, None, "learned_2d", False),
    "sp": (True, None, "learned_2d", False),
    "recompute-full": (False, ("full", "uniform", 2), "rotary_2d", False),
    "sp-recompute-block": (True, ("full", "block", 1), "learned_2d", True),
    "sp-selective": (True, ("selective", "uniform", 1), "rotary_2d", False),
}


def make_batch(seed=0, packed=True):
    from megatron_glm.data.blank_infilling import (
        BlankInfillingCollator,
        BlankInfillingConfig,
        SpecialIds,
    )

    collate = BlankInfillingCollator(
        BlankInfillingConfig(
            seq_length=SEQ, token_prob=0.6, sentence_prob=0.0, packed=packed, seed=seed
        ),
        SpecialIds(0, 1, 2, 3, 4, 5),
    )
    rng = np.random.default_rng(seed)
    return collate(
        [
            (i, {"text": rng.integers(6, VOCAB, SEQ), "document_lengths": np.array([20, 44])})
            for i in range(4)
        ]
    )


def equivalence_worker(rank, world, cases, steps):
    import torch.distributed as dist

    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel
    from megatron_glm.model.parallelize import apply_ac, apply_tp, gather_full_state, partition_of
    from megatron_glm.parallel import state
    from megatron_glm.parallel.random import model_parallel_seed
    from megatron_glm.parallel.tensor_parallel import unshard_tensors

    state.initialize_model_parallel(tp=world)
    out = {}
    for name in cases:
        sp, ac, kind, geglu = CASES[name]
        cfg = ModelConfig(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            max_position_embeddings=SEQ,
            vocab_size=VOCAB,
            position_embedding_type=kind,
            geglu=geglu,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        model_parallel_seed(0, state.get_tensor_model_parallel_rank())
        model = GLMModel(cfg)
        reference = copy.deepcopy(model)
        apply_ac(apply_tp(model, sequence_parallel=sp), *(ac or (None,)))
        assert torch.allclose(
            gather_full_state(model)["word_embeddings.weight"],
            reference.state_dict()["word_embeddings.weight"],
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
        losses, ref_losses, grad_diffs = [], [], []
        for step in range(steps):
            b = make_batch(step)
            args = (b["tokens"], b["position_ids"], b["attn_lo"], b["attn_hi"])
            loss = model.loss(model(*args), b["labels"], b["loss_mask"])[0]
            loss.backward()
            ref_loss = reference.loss(reference(*args), b["labels"], b["loss_mask"])[0]
            ref_loss.backward()
            worst = 0.0
            ref_params = dict(reference.named_parameters())
            for pname, p in model.named_parameters():
                spec = partition_of(pname, geglu)
                g = p.grad
                if spec is not None:
                    parts = [torch.empty_like(g) for _ in range(world)]
                    dist.all_gather(
                        parts, g.contiguous(), group=state.get_tensor_model_parallel_group()
                    )
                    g = unshard_tensors(parts, *spec)
                worst = max(worst, float((g - ref_params[pname].grad).abs().max()))
            losses.append(float(loss.detach()))
            ref_losses.append(float(ref_loss.detach()))
            grad_diffs.append(worst)
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
        out[name] = {"losses": losses, "ref": ref_losses, "grad_diff": max(grad_diffs)}
    return out


@pytest.mark.parametrize(
    "world, cases", [(2, list(CASES)), (4, ["plain", "sp", "sp-recompute-block"])]
)
@pytest.mark.slow
def test_tp_equals_single_process(tmp_path, world, cases):
    results = spawn(equivalence_worker, world, tmp_path, cases, 3)
    for name in cases:
        for r in results:  # every rank computes the same loss, equal to one process's
            got = r[name]
            np.testing.assert_allclose(
                got["losses"], got["ref"], rtol=1e-5, atol=1e-6, err_msg=name
            )
            assert got["grad_diff"] < 2e-5, (name, got["grad_diff"])
        assert results[0][name]["losses"][-1] < results[0][name]["losses"][0], "it trains"


def rng_and_ce_worker(rank, world):
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron_glm.parallel import state
    from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megatron_glm.parallel.random import get_rng_tracker, model_parallel_seed

    state.initialize_model_parallel(tp=world)
    model_parallel_seed(123, state.get_tensor_model_parallel_rank())
    shared = torch.rand(8)
    with get_rng_tracker().fork():
        split = torch.rand(8)
    after = torch.rand(8)  # the fork left the default generator where it was
    gathered = {}
    for key, t in (("shared", shared), ("split", split), ("after", after)):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=state.get_tensor_model_parallel_group())
        gathered[key] = parts
    torch.manual_seed(7)  # the same full logits on every rank
    logits = torch.randn(3, 5, 64, requires_grad=True)
    target = torch.randint(0, 64, (3, 5))
    ref = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(3, 5)
    (ref * torch.arange(15.0).view(3, 5)).sum().backward()
    local = (
        logits.detach()[..., rank * 64 // world : (rank + 1) * 64 // world].clone().requires_grad_()
    )
    ours = vocab_parallel_cross_entropy(local, target)
    (ours * torch.arange(15.0).view(3, 5)).sum().backward()
    return {
        "gathered": gathered,
        "loss": (ours.detach(), ref.detach()),
        "grad": (local.grad, logits.grad[..., rank * 64 // world : (rank + 1) * 64 // world]),
    }


@pytest.mark.slow
def test_rng_tracker_and_vocab_parallel_cross_entropy(tmp_path):
    results = spawn(rng_and_ce_worker, 2, tmp_path)
    g = results[0]["gathered"]
    assert torch.equal(g["shared"][0], g["shared"][1]), (
        "replicated activations: the same mask on every TP rank"
    )
    assert not torch.equal(g["split"][0], g["split"][1]), (
        "split activations: a different mask per TP rank"
    )
    assert torch.equal(g["after"][0], g["after"][1])
    for r in results:
        torch.testing.assert_close(*r["loss"])
        torch.testing.assert_close(*r["grad"])


def dropout_worker(rank, world, seed):
    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel
    from megatron_glm.model.parallelize import apply_ac, apply_tp
    from megatron_glm.parallel import state
    from megatron_glm.parallel.random import model_parallel_seed

    state.initialize_model_parallel(tp=world)
    losses = []
    for recompute in (None, "full"):
        model_parallel_seed(seed, state.get_tensor_model_parallel_rank())
        model = GLMModel(
            ModelConfig(
                num_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                max_position_embeddings=SEQ,
                vocab_size=VOCAB,
                hidden_dropout=0.2,
                attention_dropout=0.2,
            )
        )
        apply_ac(apply_tp(model, sequence_parallel=True), recompute)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for step in range(3):
            b = make_batch(step)
            loss = model.loss(
                model(b["tokens"], b["position_ids"], b["attn_lo"], b["attn_hi"]),
                b["labels"],
                b["loss_mask"],
            )[0]
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(float(loss.detach()))
        losses.append(run)
    return losses


@pytest.mark.slow
def test_dropout_runs_are_reproducible_from_the_seed(tmp_path):
    first = spawn(dropout_worker, 2, tmp_path / "a", 5)
    again = spawn(dropout_worker, 2, tmp_path / "b", 5)
    other = spawn(dropout_worker, 2, tmp_path / "c", 6)
    assert first == again, "same seed, same losses (bitwise)"
    assert first[0][0] == first[0][1], "recomputation replays the same dropout masks"
    assert first[0][0] == first[1][0], "all TP ranks agree on the loss"
    assert first[0][0] != other[0][0]


def no_collective_worker(rank, world):
    import torch.distributed as dist

    from megatron_glm.config import ModelConfig
    from megatron_glm.model.glm import GLMModel
    from megatron_glm.model.parallelize import apply_ac, apply_tp
    from megatron_glm.parallel import state

    state.initialize_model_parallel(tp=1)
    model = GLMModel(
        ModelConfig(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            max_position_embeddings=SEQ,
            vocab_size=VOCAB,
        )
    )
    apply_ac(model, "full")  # a Recompute module; then TP=1 must add no parallel one
    kinds_before = {type(m).__name__ for m in model.modules()}
    apply_tp(model, sequence_parallel=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a collective ran with TP=1")

    for name in ("all_reduce", "all_gather", "reduce_scatter", "broadcast"):
        setattr(dist, name, refuse)
    b = make_batch(0)
    loss = model.loss(
        model(b["tokens"], b["position_ids"], b["attn_lo"], b["attn_hi"]),
        b["labels"],
        b["loss_mask"],
    )[0]
    loss.backward()
    return {
        "same_modules": {type(m).__name__ for m in model.modules()} == kinds_before,
        "loss": float(loss.detach()),
    }


@pytest.mark.slow
def test_tp1_is_the_plain_model_and_runs_no_collective(tmp_path):
    (result,) = spawn(no_collective_worker, 1, tmp_path)
    assert result["same_modules"] and result["loss"] > 0
