"""One whole state dict <-> the shards of a TP x PP (x virtual stage) layout, and its checks."""

from __future__ import annotations

import torch

from megatron_glm.config import ModelConfig
from megatron_glm.model.parallelize import partition_of
from megatron_glm.parallel.pipeline import partition_layers
from megatron_glm.parallel.tensor_parallel import shard_tensor


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as asked; nothing has been written."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Parameter names and shapes of the single-process model (built on the meta device: no memory)."""
    from megatron_glm.model.glm import GLMModel

    with torch.device("meta"):
        model = GLMModel(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_entries(entries: dict, cfg: ModelConfig, source: str) -> None:
    """Refuse missing or unexpected tensors and shape mismatches, listing all of them (from shapes alone)."""
    want = expected_shapes(cfg)
    shapes = {name: tuple(entry[0]) for name, entry in entries.items()}
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    wrong = [
        f"{n}: {shapes[n]} != {want[n]}"
        for n in sorted(set(want) & set(shapes))
        if shapes[n] != want[n]
    ]

    def listed(what: str, names: list[str]) -> list[str]:
        more = " ..." if len(names) > 8 else ""
        return [f"{what} {len(names)}: {', '.join(names[:8])}{more}"] if names else []

    problems = (
        listed("missing", missing)
        + listed("unexpected", unexpected)
        + ([f"shape mismatches: {'; '.join(wrong[:8])}"] if wrong else [])
    )
    if problems:
        raise ConversionError(
            f"{source} does not match the model (layers {cfg.num_layers}, hidden {cfg.hidden_size}, "
            f"heads {cfg.num_attention_heads}, vocab {cfg.vocab_size}): " + " | ".join(problems)
        )


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


def check_repad(saved_rows: int, rows: int, used: int | None) -> None:
    """Padding rows may go; rows the tokenizer uses may not."""
    if rows < saved_rows and (used is None or rows < used):
        raise ConversionError(
            f"cannot shrink the vocabulary from {saved_rows} to {rows} rows: the tokenizer uses "
            f"{used or 'an unknown number of'} ids"
        )


def repad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """Word embeddings with ``rows`` rows: zero rows appended, or padding rows dropped (``check_repad`` first)."""
    if rows == w.shape[0]:
        return w
    if rows < w.shape[0]:
        return w[:rows].clone()
    return torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])


def placement(
    names, cfg: ModelConfig, tp: int, pp: int, vpp: int = 1, pipeline_layers=None
) -> dict[str, list[tuple[int, int, str]]]:
    """``{single-model name: [(pp_rank, tp_rank, name in that rank's file)]}``, as glm-pretrain's ranks hold
    them (the inverse of the merge)."""
    ranges = partition_layers(cfg.num_layers, pp, vpp, pipeline_layers)
    out = {name: [] for name in names}
    for p in range(pp):
        for c, layers in enumerate(ranges[p]):
            first, last = p == 0 and c == 0, p == pp - 1 and c == vpp - 1
            prefix = f"{c}." if vpp > 1 else ""
            for name in names:
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
                out[name] += [(p, t, prefix + ".".join(parts)) for t in range(tp)]
    return out


def shard_of(
    tensor: torch.Tensor, name: str, cfg: ModelConfig, tp_rank: int, tp: int
) -> torch.Tensor:
    """Rank ``tp_rank``'s piece of the whole parameter ``name``."""
    spec = partition_of(name, cfg.geglu)
    return tensor if spec is None or tp == 1 else shard_tensor(tensor, *spec, tp_rank, tp)
