"""One whole state dict <-> the shards of a TP x PP (x virtual stage) layout, and its checks."""

from __future__ import annotations

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.model.parallelize import partition_of
from megatron_glm.parallel.pipeline import partition_layers
from megatron_glm.parallel.tensor_parallel import shard_tensor
from megatron_glm.serialization import check_finite


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as asked; nothing has been written."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Parameter names and shapes of the single-process model (built on the meta device: no memory)."""
    from megatron_glm.model.glm import GLMModel

    with torch.device("meta"):
        model = GLMModel(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state(state: dict, cfg: ModelConfig, source: str) -> None:
    """Refuse missing or unexpected tensors and shape mismatches, listing all of them."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [
        f"{n}: {tuple(state[n].shape)} != {want[n]}"
        for n in sorted(set(want) & set(state))
        if tuple(state[n].shape) != want[n]
    ]
    problems = (
        (
            [
                f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            ]
            if missing
            else []
        )
        + (
            [
                f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            ]
            if unexpected
            else []
        )
        + ([f"shape mismatches: {'; '.join(wrong[:8])}"] if wrong else [])
    )
    if problems:
        raise ConversionError(
            f"{source} does not match the model (layers {cfg.num_layers}, hidden {cfg.hidden_size}, "
            f"heads {cfg.num_attention_heads}, vocab {cfg.vocab_size}): " + " | ".join(problems)
        )
    check_finite(state.items(), source)


def check_target(cfg: ModelConfig, tp: int, pp: int, vpp: int, pipeline_layers) -> None:
    """A layout the model cannot take is refused before anything is written."""
    problems = []
    if cfg.num_attention_heads % tp:
        problems.append(
            f"--target-tp {tp} does not divide {cfg.num_attention_heads} attention heads"
        )
    if cfg.ffn_hidden_size % tp:
        problems.append(f"--target-tp {tp} does not divide the MLP width {cfg.ffn_hidden_size}")
    if cfg.vocab_size % tp:
        problems.append(
            f"--target-tp {tp} does not divide the (padded) vocabulary {cfg.vocab_size}"
        )
    try:
        partition_layers(cfg.num_layers, pp, vpp, pipeline_layers)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ConversionError("impossible target layout: " + "; ".join(problems))


def repad_vocab(state: dict, rows: int, used: int | None) -> dict:
    """Word embeddings with ``rows`` rows: zero rows appended, or padding rows (ids >= ``used``) dropped."""
    w = state["word_embeddings.weight"]
    if rows == w.shape[0]:
        return state
    if rows < w.shape[0] and (used is None or rows < used):
        raise ConversionError(
            f"cannot shrink the vocabulary from {w.shape[0]} to {rows} rows: the tokenizer uses "
            f"{used or 'an unknown number of'} ids"
        )
    if rows < w.shape[0]:
        new = w[:rows].clone()
    else:
        new = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
    return {**state, "word_embeddings.weight": new}


def split_for_layout(
    state: dict, cfg: ModelConfig, tp: int, pp: int, vpp: int = 1, pipeline_layers=None
) -> dict[tuple[int, int], dict]:
    """``{(pp_rank, tp_rank): module state dict}`` as glm-pretrain's ranks hold them (the inverse of the merge)."""
    ranges = partition_layers(cfg.num_layers, pp, vpp, pipeline_layers)
    out = {}
    for p in range(pp):
        for t in range(tp):
            shard = {}
            for c, layers in enumerate(ranges[p]):
                first, last = p == 0 and c == 0, p == pp - 1 and c == vpp - 1
                prefix = f"{c}." if vpp > 1 else ""
                for name, tensor in state.items():
                    parts = name.split(".")
                    if parts[:2] == ["transformer", "layers"]:
                        i = int(parts[2])
                        if i not in layers:
                            continue
                        parts[2] = str(i - layers.start)
                    elif name.startswith(
                        (
                            "word_embeddings.",
                            "transformer.position_embeddings.",
                            "transformer.block_position_embeddings.",
                        )
                    ):
                        if not first:
                            continue
                    elif name.startswith("transformer.final_layernorm."):
                        if not last:
                            continue
                    spec = partition_of(name, cfg.geglu)
                    local = (
                        tensor if spec is None or tp == 1 else shard_tensor(tensor, *spec, t, tp)
                    )
                    shard[prefix + ".".join(parts)] = local.contiguous()
            out[(p, t)] = shard
    return out
