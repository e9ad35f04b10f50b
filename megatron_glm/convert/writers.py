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

from megatron_glm.checkpoint import LATEST, META, model_file, tag_of
from megatron_glm.checkpoint.format import settings_for_layout
from megatron_glm.config import ModelConfig
from megatron_glm.convert.layout import ConversionError, check_target, repad_vocab, split_for_layout
from megatron_glm.parallel.pipeline import partition_layers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _stage(out: str, overwrite: bool) -> str:
    if os.path.exists(out) and not overwrite:
        raise ConversionError(
            f"{out} exists; pass --overwrite to replace it (or choose another --save)"
        )
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
    return (
        cfg.vocab_size if cfg.vocab_size % tp == 0 else -(-cfg.vocab_size // (128 * tp)) * 128 * tp
    )


def write_megatron_glm(
    out: str,
    state: dict,
    cfg: ModelConfig,
    info: dict,
    tp: int = 1,
    pp: int = 1,
    vpp: int = 1,
    pipeline_layers=None,
    dtype: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    source: str = "",
) -> list[tuple[str, int]]:
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
    plan = [
        (model_file(tag, p, t, tp), _nbytes(sd.values())) for (p, t), sd in sorted(shards.items())
    ] + [(os.path.join(tag, META), 0), (LATEST, 0)]
    if dry_run:
        return plan
    partial = _stage(out, overwrite)
    os.makedirs(os.path.join(partial, tag))
    for (p, t), sd in tqdm(
        sorted(shards.items()), desc="writing shards", unit="file", disable=len(shards) < 4
    ):
        torch.save(
            {"module": sd, "iteration": iteration}, model_file(os.path.join(partial, tag), p, t, tp)
        )
    meta = {
        "model": cfg.to_dict(),
        "tokenizer": info.get("tokenizer"),
        "seq_length": info.get("seq_length"),
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "pipeline_layers": [
            [[r.start, r.stop] for r in stage]
            for stage in partition_layers(cfg.num_layers, pp, vpp, pipeline_layers)
        ],
        "iteration": iteration,
        "consumed_samples": info.get("consumed_samples", 0),
        "weights_only": True,
        "converted_from": source,
        "settings": settings_for_layout(
            {"model": cfg.to_dict(), "settings": info.get("settings")}, tp, pp, vpp, pipeline_layers
        ),
    }
    with open(os.path.join(partial, tag, META), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(partial, LATEST), "w") as f:
        f.write(tag)
    _commit(partial, out)
    return plan


def hf_config(cfg: ModelConfig, info: dict, dtype: torch.dtype) -> dict:
    """``config.json``: transformers' view (our model_type and files, via ``auto_map``) and our own record."""
    special = (info.get("tokenizer") or {}).get("special_ids") or {}
    return {
        "architectures": ["MegatronGLMForCausalLM"],
        "model_type": "megatron_glm",
        "auto_map": {
            "AutoConfig": "configuration_megatron_glm.MegatronGLMConfig",
            "AutoModelForCausalLM": "modeling_megatron_glm.MegatronGLMForCausalLM",
        },
        "dtype": str(dtype).replace("torch.", ""),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "position_embedding_type": cfg.position_embedding_type,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "geglu": cfg.geglu,
        "deepnorm": cfg.deepnorm,
        "rotary_base": cfg.rotary_base,
        "hidden_dropout": cfg.hidden_dropout,
        "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.init_method_std,
        **{
            f"{role}_token_id": special.get(role)
            for role in ("mask", "smask", "gmask", "sop", "eop", "pad", "eos")
        },
        "tie_word_embeddings": False,
        "megatron_glm": {
            "model": cfg.to_dict(),
            "tokenizer": info.get("tokenizer") or None,
            "iteration": info.get("iteration", 0),
            "consumed_samples": info.get("consumed_samples", 0),
            "seq_length": info.get("seq_length"),
            # the run's settings: glm-eval takes the data split and objective from them
            "settings": info.get("settings"),
        },
    }


def hf_tokenizer_config(tokenizer: dict, max_length: int) -> dict:
    """``tokenizer_config.json`` for ``MegatronGLMTokenizer``: the backend, each special token's id and spellings."""
    from megatron_glm.data.tokenizer import SPECIAL_TOKENS

    return {
        "tokenizer_class": "MegatronGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_megatron_glm.MegatronGLMTokenizer", None]},
        "glm_backend": tokenizer["type"],
        "glm_special_tokens": {
            role: {"id": i, "spellings": list(SPECIAL_TOKENS[role])}
            for role, i in tokenizer["special_ids"].items()
        },
        "model_max_length": max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }


def _as_created(folder: str, names: list[str]) -> None:
    """The mode ``open`` gives a new file (0644 under the usual umask): huggingface_hub writes its shards
    through temporary files (0600), which a serving container under another uid could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def write_hf(
    out: str,
    state: dict,
    cfg: ModelConfig,
    info: dict,
    dtype: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> list[tuple[str, int]]:
    """A folder transformers loads with ``trust_remote_code=True``: weights, config, code and tokenizer.

    Weights are safetensors, split into shards with an index above ``max_shard_size``. The
    tokenizer files take the names ``tokenization_megatron_glm`` reads; our own record of
    them (type, fingerprint, special ids) stays in ``config.json`` for ``import-hf``.
    """
    from huggingface_hub import save_torch_state_dict, split_torch_state_dict_into_shards

    from megatron_glm.convert import hf_files
    from megatron_glm.convert.hf_files.tokenization_megatron_glm import FILES as TOKENIZER_FILES

    if dtype:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    tokenizer = dict(info.get("tokenizer") or {})
    sources = tokenizer.get("files") or []
    missing = [f for f in sources if not os.path.exists(f)]
    if missing:
        raise ConversionError(
            f"the checkpoint's tokenizer files are gone: {missing}; the export must carry them"
        )
    names = TOKENIZER_FILES.get(tokenizer.get("type"), ()) if sources else ()
    if sources and len(names) != len(sources):
        raise ConversionError(
            f"a {tokenizer.get('type')} tokenizer with files {sources}: expected "
            f"{len(names)} ({', '.join(names) or 'a known tokenizer type'})"
        )
    # a tensor that is a view of a larger buffer (a vocabulary cut from its padding) is written as its own copy
    state = {
        k: v if v.untyped_storage().nbytes() == _nbytes([v]) else v.clone()
        for k, v in state.items()
    }
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    weights = [
        (f, _nbytes(state[n] for n in tensors))
        for f, tensors in sorted(split.filename_to_tensors.items())
    ]
    if split.is_sharded:
        weights.append(("model.safetensors.index.json", 0))
    plan = (
        weights
        + [("config.json", 0), ("generation_config.json", 0)]
        + [(f, 0) for f in hf_files.FILES]
        + [(name, os.path.getsize(f)) for name, f in zip(names, sources)]
        + ([("tokenizer_config.json", 0)] if names else [])
    )
    if dry_run:
        return plan
    partial = _stage(out, overwrite)
    save_torch_state_dict(state, partial, max_shard_size=max_shard_size, metadata={"format": "pt"})
    _as_created(partial, [f for f, _ in weights])
    for f in hf_files.FILES:
        shutil.copy2(os.path.join(os.path.dirname(hf_files.__file__), f), os.path.join(partial, f))
    for name, f in zip(names, sources):
        shutil.copy2(f, os.path.join(partial, name))
    if names:
        tokenizer["files"] = list(names)  # relative to the export folder
        with open(os.path.join(partial, "tokenizer_config.json"), "w") as f:
            json.dump(hf_tokenizer_config(tokenizer, cfg.max_position_embeddings), f, indent=1)
    config = hf_config(
        cfg, {**info, "tokenizer": tokenizer or None}, next(iter(state.values())).dtype
    )
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    special = tokenizer.get("special_ids") or {}
    with open(os.path.join(partial, "generation_config.json"), "w") as f:  # a span ends at [eop]
        json.dump(
            {"eos_token_id": special.get("eop"), "pad_token_id": special.get("pad")}, f, indent=1
        )
    _commit(partial, out)
    return plan
