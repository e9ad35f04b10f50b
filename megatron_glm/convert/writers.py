"""Writers: a whole state dict -> a megatron-glm checkpoint in a target layout, or a HF style folder.

Output is staged in ``{out}.partial`` and renamed into place at the end, so an interrupted
conversion leaves no half-written checkpoint; an existing ``out`` is replaced only with
``overwrite``. ``dry_run`` returns the plan (every file and its size) and writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from tqdm import tqdm

from megatron_glm.config import ModelConfig
from megatron_glm.convert.layout import ConversionError, check_target, repad_vocab, split_for_layout
from megatron_glm.parallel.pipeline import partition_layers
from megatron_glm.training.checkpoint import LATEST, tag_of

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _stage(out: str, overwrite: bool) -> str:
    if os.path.exists(out) and not overwrite:
        raise ConversionError(f"{out} exists; pass --overwrite to replace it (or choose another --save)")
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    return partial


def _commit(partial: str, out: str) -> None:
    if os.path.exists(out):
        old = out.rstrip("/") + ".old"
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)


def target_vocab(cfg: ModelConfig, info: dict, tp: int) -> int:
    """glm-pretrain's padding for this TP when the tokenizer is known; else the rows, rounded up to divide by TP."""
    used = (info.get("tokenizer") or {}).get("vocab_size")
    if used:
        step = 128 * tp
        return -(-used // step) * step
    return cfg.vocab_size if cfg.vocab_size % tp == 0 else -(-cfg.vocab_size // (128 * tp)) * 128 * tp


def write_megatron_glm(out: str, state: dict, cfg: ModelConfig, info: dict, tp: int = 1, pp: int = 1, vpp: int = 1,
                       pipeline_layers=None, dtype: str | None = None, dry_run: bool = False,
                       overwrite: bool = False, source: str = "") -> list[tuple[str, int]]:
    """A weights-only glm-pretrain checkpoint for TP x PP (x vpp); glm-pretrain resumes it with a fresh optimizer."""
    rows = target_vocab(cfg, info, tp)
    used = (info.get("tokenizer") or {}).get("vocab_size")
    state = repad_vocab(state, rows, used)
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": rows})
    check_target(cfg, tp, pp, vpp, pipeline_layers)
    if dtype:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    shards = split_for_layout(state, cfg, tp, pp, vpp, pipeline_layers)
    iteration = info.get("iteration", 0)
    tag = tag_of(iteration)
    plan = [(os.path.join(tag, f"mp_rank_{p * tp + t:02d}_model_states.pt"), _nbytes(sd.values()))
            for (p, t), sd in sorted(shards.items())] + [(os.path.join(tag, "meta.json"), 0), (LATEST, 0)]
    if dry_run:
        return plan
    partial = _stage(out, overwrite)
    os.makedirs(os.path.join(partial, tag))
    for (p, t), sd in tqdm(sorted(shards.items()), desc="writing shards", unit="file", disable=len(shards) < 4):
        torch.save({"module": sd, "iteration": iteration},
                   os.path.join(partial, tag, f"mp_rank_{p * tp + t:02d}_model_states.pt"))
    meta = {"model": cfg.to_dict(), "tokenizer": info.get("tokenizer"), "seq_length": info.get("seq_length"),
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "pipeline_layers": [[[r.start, r.stop] for r in stage]
                                for stage in partition_layers(cfg.num_layers, pp, vpp, pipeline_layers)],
            "iteration": iteration, "consumed_samples": info.get("consumed_samples", 0),
            "weights_only": True, "converted_from": source, "args": {"zero_stage": 0}}
    with open(os.path.join(partial, tag, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(partial, LATEST), "w") as f:
        f.write(tag)
    _commit(partial, out)
    return plan


def write_hf(out: str, state: dict, cfg: ModelConfig, info: dict, dtype: str | None = None, dry_run: bool = False,
             overwrite: bool = False) -> list[tuple[str, int]]:
    """``model.safetensors`` + ``config.json`` + the tokenizer files: a folder that stands on its own."""
    from safetensors.torch import save_file

    if dtype:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    tokenizer = info.get("tokenizer") or {}
    files = tokenizer.get("files") or []
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise ConversionError(f"the checkpoint's tokenizer files are gone: {missing}; the export must carry them")
    plan = [("model.safetensors", _nbytes(state.values())), ("config.json", 0)] + \
        [(os.path.basename(f), os.path.getsize(f)) for f in files]
    if dry_run:
        return plan
    partial = _stage(out, overwrite)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(partial, "model.safetensors"),
              metadata={"format": "pt"})
    for f in files:
        shutil.copy2(f, os.path.join(partial, os.path.basename(f)))
    some = next(iter(state.values()))
    config = {"architectures": ["GLMModel"], "model_type": "glm", "torch_dtype": str(some.dtype).replace("torch.", ""),
              "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size,
              "max_position_embeddings": cfg.max_position_embeddings,
              "megatron_glm": {"model": cfg.to_dict(), "tokenizer": tokenizer or None,
                               "iteration": info.get("iteration", 0),
                               "consumed_samples": info.get("consumed_samples", 0),
                               "seq_length": info.get("seq_length")}}
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    _commit(partial, out)
    return plan
