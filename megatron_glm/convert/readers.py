"""Readers: a checkpoint in some format -> (whole state dict, ModelConfig, info).

``info`` carries what a writer needs besides the weights: the tokenizer description,
iteration and consumed samples (megatron-glm sources), and notes for the user.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile

import torch

from megatron_glm import checkpoint as ckpt
from megatron_glm import serialization
from megatron_glm.config import ModelConfig, preset
from megatron_glm.convert.layout import ConversionError


def detect_format(path: str) -> str:
    if (
        os.path.isdir(path)
        and os.path.exists(os.path.join(path, "config.json"))
        and glob.glob(os.path.join(path, "*.safetensors"))
    ):
        return "hf"
    try:
        ckpt.locate(path)
        return "megatron-glm"
    except ckpt.CheckpointError:
        pass
    if (
        not ckpt.is_iteration_folder(path)
        and not ckpt.list_checkpoints(path)
        and glob.glob(os.path.join(path, "**", "mp_rank_*_model_states.pt"), recursive=True)
    ) or re.search(r"mp_rank_\d+_model_states\.pt$", path):
        return "thudm"
    raise ConversionError(
        f"{path} {ckpt.what_is_at(path)}; expected a megatron-glm checkpoint folder "
        "(iter_*/meta.json) or one iter_N folder in it, an original GLM checkpoint "
        "(mp_rank_XX_model_states.pt), or a Hugging Face style folder (config.json + *.safetensors)"
    )


def _info(meta: dict) -> dict:
    return {
        "tokenizer": meta.get("tokenizer"),
        "iteration": meta["iteration"],
        "consumed_samples": meta.get("consumed_samples", 0),
        "seq_length": meta.get("seq_length"),
        "source_layout": (
            meta.get("tensor_model_parallel_size", 1),
            meta.get("pipeline_model_parallel_size", 1),
        ),
        "settings": ckpt.settings_of(meta).record(),
    }


def read_megatron_glm(
    path: str, tag: str | None = None, trust: bool = False
) -> tuple[dict, ModelConfig, dict]:
    """Whole weights of a glm-pretrain checkpoint; ZeRO-3 partitions are consolidated on the way."""
    if tag is None:
        path, tag = ckpt.locate(path)
    meta = ckpt.read_meta(path, tag)
    if ckpt.settings_of(meta).parallel.zero_stage == 3:
        state = _consolidate_zero(path, tag, meta, trust)
    else:
        state, meta = ckpt.load_model_weights(path, tag, trust)
    return state, ModelConfig.from_dict(meta["model"]), _info(meta)


def zero_to_fp32(
    path: str, tag: str | None = None, trust: bool = False
) -> tuple[dict, ModelConfig, dict]:
    """The fp32 master weights from the optimizer partitions (any ZeRO stage >= 1), merged over TP x PP."""
    if tag is None:
        path, tag = ckpt.locate(path)
    meta = ckpt.read_meta(path, tag)
    if not ckpt.settings_of(meta).parallel.zero_stage:
        raise ConversionError(
            f"{path}/{tag} was saved without ZeRO (--zero-stage 0): its weights are already whole; "
            "use `glm-convert reshard` or `export-hf`"
        )
    return (
        _consolidate_zero(path, tag, meta, trust),
        ModelConfig.from_dict(meta["model"]),
        _info(meta),
    )


def _consolidate_zero(
    path: str, tag: str, meta: dict, trust: bool = False, state: str = "fp32"
) -> dict:
    """DeepSpeed's consolidation, once per model-parallel rank (it assumes one), then the TP x PP merge.

    ``state`` "exp_avg" or "exp_avg_sq" consolidates that Adam moment instead of the fp32 weights:
    the moments are flat partitions laid out exactly as the weights' (one per parameter group),
    so each optimizer file is staged with its fp32 partitions replaced by the moment's, and
    DeepSpeed's own unflattening does the rest. DeepSpeed's consolidation unpickles without
    restriction, so unless ``trust`` it reads copies that were loaded through the allow-list and
    saved again: only vetted objects reach it.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = os.path.join(path, tag)
    tp = meta.get("tensor_model_parallel_size", 1)

    def read(p, t):
        mp = f"mp_rank_{p * tp + t:02d}"
        files = [
            f
            for f in os.listdir(folder)
            if mp in f and f.endswith(("_optim_states.pt", "_model_states.pt"))
        ]
        if not any(f.endswith("_optim_states.pt") for f in files):
            raise ConversionError(f"{folder} has no ZeRO optimizer partitions for {mp}")
        # one model-parallel rank's files under DeepSpeed's names
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, tag))
            for f in files:
                source, staged = (
                    os.path.join(folder, f),
                    os.path.join(tmp, tag, f.replace(mp, "mp_rank_00")),
                )
                if state != "fp32" and f.endswith("_optim_states.pt"):
                    torch.save(
                        _with_moment(serialization.load(source, trust=trust), state, source), staged
                    )
                elif trust:
                    os.symlink(source, staged)
                else:
                    torch.save(serialization.load(source), staged)
            merged = get_fp32_state_dict_from_zero_checkpoint(tmp, tag)
        return {k: v.float() for k, v in merged.items()}

    return ckpt.merge_model_shards(read, meta)


def _zero_partitions(optim: dict, source: str) -> tuple[str, dict]:
    """(key of the fp32 flat partitions, the base optimizer's state dict) in a ZeRO optimizer file."""
    osd = optim.get("optimizer_state_dict") if isinstance(optim, dict) else None
    # ZeRO-1/2 (and DeepSpeed's bf16)
    if isinstance(osd, dict) and "single_partition_of_fp32_groups" in osd:
        return "single_partition_of_fp32_groups", osd["base_optimizer_state"]
    if isinstance(osd, dict) and "fp32_flat_groups" in osd:  # ZeRO-3
        return "fp32_flat_groups", osd["optimizer_state_dict"]
    raise ConversionError(
        f"{source}: not a DeepSpeed ZeRO optimizer file (no fp32 flat partitions)"
    )


def _with_moment(optim: dict, state: str, source: str) -> dict:
    key, base = _zero_partitions(optim, source)
    groups = optim["optimizer_state_dict"][key]
    try:
        moments = [base["state"][i][state] for i in range(len(groups))]
    except (KeyError, IndexError):
        raise ConversionError(
            f"{source} holds no Adam {state} for every parameter group: not an Adam optimizer's "
            "state, or saved before the first step"
        ) from None
    optim["optimizer_state_dict"][key] = [m.float() for m in moments]
    return optim


THUDM_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


def read_thudm(
    path: str,
    num_attention_heads: int | None = None,
    preset_name: str | None = None,
    trust: bool = False,
) -> tuple[dict, ModelConfig, dict]:
    """An original GLM checkpoint (THUDM/GLM): ``mp_rank_XX_model_states.pt`` files, any MP."""
    from megatron_glm.model.parallelize import partition_of
    from megatron_glm.parallel.tensor_parallel import unshard_tensors

    files = (
        sorted(glob.glob(os.path.join(path, "**", "mp_rank_*_model_states.pt"), recursive=True))
        if os.path.isdir(path)
        else [path]
    )
    if os.path.isdir(path) and os.path.exists(
        os.path.join(path, "latest_checkpointed_iteration.txt")
    ):
        with open(os.path.join(path, "latest_checkpointed_iteration.txt")) as f:
            it = f.read().strip()
        files = [f for f in files if os.path.basename(os.path.dirname(f)) == it] or files
    if not files:
        raise ConversionError(
            f"{path} holds no mp_rank_XX_model_states.pt: not an original GLM checkpoint folder"
        )
    folders = {os.path.dirname(f) for f in files}
    if len(folders) > 1:
        raise ConversionError(
            f"{path} holds several iterations ({sorted(folders)}); point at one of them"
        )
    shards = []
    for f in files:
        obj = serialization.load(f, trust=trust)
        sd = obj.get("module", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ConversionError(f"{f}: no state dict under 'module'")
        shards.append(
            {
                k[len("module.") :] if k.startswith("module.") else k: v
                for k, v in sd.items()
                if torch.is_tensor(v)
            }
        )
    numbers = [int(re.search(r"mp_rank_(\d+)", os.path.basename(f)).group(1)) for f in files]
    if numbers != list(range(len(files))):
        raise ConversionError(
            f"model-parallel files {numbers} in {sorted(folders)}: some are missing"
        )
    names = set(shards[0])
    for i, s in enumerate(shards[1:], 1):
        if set(s) != names:
            raise ConversionError(
                f"mp_rank_{i:02d} holds other tensors than mp_rank_00: {sorted(set(s) ^ names)[:8]}"
            )
    state = {}
    for name in sorted(names):
        spec = partition_of(name)
        state[name] = (
            shards[0][name]
            if spec is None or len(shards) == 1
            else unshard_tensors([s[name] for s in shards], *spec)
        )
    if "word_embeddings.weight" not in state:
        raise ConversionError(f"{path}: no word_embeddings.weight: not a GLM checkpoint")
    layers = {int(m.group(1)) for m in map(THUDM_LAYER.match, state) if m}
    base = preset(preset_name) if preset_name else None
    heads = num_attention_heads or (base.num_attention_heads if base else None)
    if heads is None:
        raise ConversionError(
            "the number of attention heads is not in the weights: pass --num-attention-heads "
            "or --preset"
        )
    vocab, hidden = state["word_embeddings.weight"].shape
    cfg = ModelConfig(
        num_layers=len(layers),
        hidden_size=hidden,
        num_attention_heads=heads,
        vocab_size=vocab,
        ffn_hidden_size=state["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape[0]
        if "transformer.layers.0.mlp.dense_h_to_4h.weight" in state
        else None,
        max_position_embeddings=state["transformer.position_embeddings.weight"].shape[0] - 1
        if "transformer.position_embeddings.weight" in state
        else 512,
    )
    # the heads are not in the weights: a preset that disagrees on any size is the wrong one
    if base is not None:
        wrong = [
            f"{name} {getattr(base, name)} (the weights have {getattr(cfg, name)})"
            for name in ("num_layers", "hidden_size", "ffn_hidden_size", "max_position_embeddings")
            if getattr(cfg, name) is not None and getattr(base, name) != getattr(cfg, name)
        ]
        if wrong:
            raise ConversionError(
                f"--preset {preset_name} does not describe {path}: it has {'; '.join(wrong)}. "
                "Pass the right --preset, or --num-attention-heads alone"
            )
    return (
        state,
        cfg,
        {
            "tokenizer": None,
            "iteration": 0,
            "consumed_samples": 0,
            "source_layout": (len(shards), 1),
        },
    )


def read_hf(path: str) -> tuple[dict, ModelConfig, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}/config.json is not valid JSON ({e})") from None
    # "glm" is what exports before the transformers-loadable one said
    if (
        not isinstance(config, dict)
        or config.get("model_type") not in ("megatron_glm", "glm")
        or "megatron_glm" not in config
    ):
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise ConversionError(
            f"{path}/config.json is not a megatron-glm export (model_type {model_type!r})"
        )
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # sharded: the index names every shard
        with open(index) as f:
            listed = sorted(set(json.load(f).get("weight_map", {}).values()))
        gone = [name for name in listed if not os.path.exists(os.path.join(path, name))]
        if gone:
            raise ConversionError(
                f"{path} is missing {len(gone)} of its {len(listed)} weight shards ({gone[0]}...): "
                "copy the whole export folder, or export it again"
            )
        files = [os.path.join(path, name) for name in listed]
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise ConversionError(
                f"{f}: not a readable safetensors file ({e}): truncated or corrupt; export it again"
            ) from None
    tokenizer = config["megatron_glm"].get("tokenizer")
    if tokenizer:  # the files travel with the folder
        tokenizer = {
            **tokenizer,
            "files": [os.path.join(path, os.path.basename(p)) for p in tokenizer["files"]],
        }
    ours = config["megatron_glm"]
    # the run's settings (exports before they existed recorded its flags as training_args)
    settings = ckpt.settings_of(
        {
            "model": ours["model"],
            "settings": ours.get("settings"),
            "args": ours.get("training_args"),
        }
    ).record()
    return (
        state,
        ModelConfig.from_dict(ours["model"]),
        {
            "tokenizer": tokenizer,
            "iteration": ours.get("iteration", 0),
            "consumed_samples": ours.get("consumed_samples", 0),
            "seq_length": ours.get("seq_length"),
            "settings": settings,
        },
    )
