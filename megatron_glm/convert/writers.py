"""Writers: a source (``convert/sources.py``) -> a megatron-glm checkpoint in a target layout, or a HF style
folder, streamed one parameter (or output file) at a time.

Output is staged in ``{out}.partial`` and renamed into place at the end, so an interrupted
conversion leaves no half-written checkpoint; an existing ``out`` is replaced only with
``overwrite``. ``dry_run`` returns the plan (every file and its size) and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct

import torch

from megatron_glm.checkpoint import LATEST, META, model_file, tag_of
from megatron_glm.checkpoint.format import settings_for_layout
from megatron_glm.config import ModelConfig
from megatron_glm.convert.layout import (
    ConversionError,
    check_entries,
    check_repad,
    check_target,
    placement,
    repad_rows,
    shard_of,
)
from megatron_glm.convert.workers import run_jobs
from megatron_glm.model.parallelize import partition_of
from megatron_glm.parallel.pipeline import partition_layers
from megatron_glm.parallel.tensor_parallel import sharded_shape

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


@contextlib.contextmanager
def _discarded_on_error(partial: str):
    """The staged output goes if a job fails (a tensor that is not finite, a source file missing)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _reserve(path: str, tensors: dict[str, tuple[tuple, torch.dtype]], extra: dict) -> None:
    """A torch file of empty tensors: their space is reserved (sparse), none of it allocated in memory."""
    module = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in tensors.items()}
    with torch.serialization.skip_data():
        torch.save({"module": module, **extra}, path)


def _fill_megatron_glm(work, name: str, places, rows: int, dtype, folder: str, cfg, tp: int):
    value = work.source.get(name)
    if name == "word_embeddings.weight":
        value = repad_rows(value, rows)
    value = value.to(dtype or value.dtype)
    for p, t, local in places:
        file = work.output(model_file(folder, p, t, tp))
        file.fill(file.value["module"][local], shard_of(value, name, cfg, t, tp))


def write_megatron_glm(
    out: str,
    source,
    tp: int = 1,
    pp: int = 1,
    vpp: int = 1,
    pipeline_layers=None,
    dtype: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    converted_from: str = "",
    workers: int = 1,
) -> list[tuple[str, int]]:
    """A weights-only glm-pretrain checkpoint for TP x PP (x vpp) from ``source`` (``convert/sources.py``),
    one parameter at a time; glm-pretrain resumes it with a fresh optimizer.

    Each output file is first written with its tensors' space reserved, then mapped and filled in place
    parameter by parameter (by ``workers`` processes), so memory holds a few parameters, never a shard.
    """
    cfg, info = source.cfg, source.info
    check_entries(source.entries, cfg, str(source))
    rows = target_vocab(cfg, info, tp)
    check_repad(cfg.vocab_size, rows, (info.get("tokenizer") or {}).get("vocab_size"))
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": rows})
    check_target(cfg, tp, pp, vpp, pipeline_layers)
    places = placement(sorted(source.entries), cfg, tp, pp, vpp, pipeline_layers)
    out_dtype = DTYPES[dtype] if dtype else None
    files: dict[tuple[int, int], dict] = {(p, t): {} for p in range(pp) for t in range(tp)}
    for name, (shape, saved) in sorted(source.entries.items()):
        if name == "word_embeddings.weight":
            shape = (rows, *shape[1:])
        for p, t, local in places[name]:
            files[p, t][local] = (
                sharded_shape(shape, partition_of(name, cfg.geglu), tp),
                out_dtype or saved,
            )
    iteration = info.get("iteration", 0)
    tag = tag_of(iteration)
    plan = [
        (model_file(tag, p, t, tp), sum(math.prod(s) * d.itemsize for s, d in tensors.values()))
        for (p, t), tensors in sorted(files.items())
    ] + [(os.path.join(tag, META), 0), (LATEST, 0)]
    if dry_run:
        return plan
    partial = _stage(out, overwrite)
    folder = os.path.join(partial, tag)
    os.makedirs(folder)
    with _discarded_on_error(partial):
        for (p, t), tensors in sorted(files.items()):
            _reserve(model_file(folder, p, t, tp), tensors, {"iteration": iteration})
        jobs = [
            (name, places[name], rows, out_dtype, folder, cfg, tp)
            for name in sorted(source.entries)
        ]
        run_jobs(source, _fill_megatron_glm, jobs, workers, "writing parameters", "param")
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
        "converted_from": converted_from,
        "settings": settings_for_layout(
            {"model": cfg.to_dict(), "settings": info.get("settings")}, tp, pp, vpp, pipeline_layers
        ),
    }
    with open(os.path.join(folder, META), "w") as f:
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


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(work, path: str, tensors: list[tuple[str, tuple, torch.dtype]], metadata):
    """One safetensors file, written tensor by tensor: the header (8-byte length, JSON with every tensor's
    dtype, shape and byte range, padded to 8 bytes), then the tensors' bytes in that order. The
    safetensors package has no such writer: it takes every tensor's bytes at once."""
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, _, dtype in tensors:
            value = work.source.get(name)
            f.write(value.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())


def write_hf(
    out: str,
    source,
    dtype: str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    workers: int = 1,
) -> list[tuple[str, int]]:
    """A folder transformers loads with ``trust_remote_code=True``: weights, config, code and tokenizer.

    Weights are safetensors, split into shards with an index above ``max_shard_size`` (huggingface_hub's
    split), each written tensor by tensor (a shard per job of ``workers``). The tokenizer files take the
    names ``tokenization_megatron_glm`` reads; our own record of them (type, fingerprint, special ids)
    stays in ``config.json`` for ``import-hf``.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    from megatron_glm.convert import hf_files
    from megatron_glm.convert.hf_files.tokenization_megatron_glm import FILES as TOKENIZER_FILES

    cfg, info = source.cfg, source.info
    check_entries(source.entries, cfg, str(source))
    entries = {
        name: (tuple(shape), DTYPES[dtype] if dtype else saved)
        for name, (shape, saved) in source.entries.items()
    }
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
    split = split_state_dict_into_shards_factory(
        entries,
        get_storage_size=lambda entry: math.prod(entry[0]) * entry[1].itemsize,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    weights = [
        (f, sum(math.prod(entries[n][0]) * entries[n][1].itemsize for n in tensors))
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
    with _discarded_on_error(partial):
        jobs = [
            (os.path.join(partial, f), [(n, *entries[n]) for n in tensors], {"format": "pt"})
            for f, tensors in sorted(split.filename_to_tensors.items())
        ]
        run_jobs(source, _write_safetensors, jobs, workers, "writing shards", "file")
    if split.is_sharded:
        with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
            json.dump(
                {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2
            )
    for f in hf_files.FILES:
        shutil.copy2(os.path.join(os.path.dirname(hf_files.__file__), f), os.path.join(partial, f))
    for name, f in zip(names, sources):
        shutil.copy2(f, os.path.join(partial, name))
    if names:
        tokenizer["files"] = list(names)  # relative to the export folder
        with open(os.path.join(partial, "tokenizer_config.json"), "w") as f:
            json.dump(hf_tokenizer_config(tokenizer, cfg.max_position_embeddings), f, indent=1)
    config = hf_config(
        cfg, {**info, "tokenizer": tokenizer or None}, entries["word_embeddings.weight"][1]
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
