"""Checkpoints of each format glm-convert reads, one whole parameter at a time.

A source gives the model's config, ``info`` (what a writer needs besides the weights: the
tokenizer, iteration and consumed samples, the run's settings), ``entries`` (every parameter's
whole shape and dtype, known without reading any data) and ``get(name)``: that parameter merged
over the layout it was saved on, as a tensor of its own. Files are memory-mapped and every read's
pages are handed back, so a conversion holds a few parameters, never the model, and ``opener``
lets each worker process open the same source for itself.
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch

from megatron_glm import checkpoint as ckpt
from megatron_glm import serialization
from megatron_glm.checkpoint.mapped import MappedFile
from megatron_glm.checkpoint.partitions import SavedTrainingState
from megatron_glm.checkpoint.shard_reader import ShardReader
from megatron_glm.config import ModelConfig, preset
from megatron_glm.convert.layout import ConversionError
from megatron_glm.model.parallelize import partition_of
from megatron_glm.parallel.tensor_parallel import unshard_tensors, unsharded_shape


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


class Source:
    """What every source has; subclasses fill ``cfg``, ``info``, ``entries``, ``opener`` and ``_read``."""

    cfg: ModelConfig
    info: dict
    entries: dict[str, tuple[tuple[int, ...], torch.dtype]]
    # ``opener[0](*opener[1:])`` opens this source again (in a worker); None: it cannot be
    opener: tuple | None = None
    where: str = ""

    def __str__(self) -> str:
        return self.where

    def get(self, name: str) -> torch.Tensor:
        """The whole parameter, refused if it holds a NaN or an Inf."""
        value = self._read(name)
        serialization.check_finite([(name, value)], self.where)
        return value

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The whole model at once: only for what needs it in one process (glm-generate)."""
        return {name: self.get(name) for name in self.entries}


class StateDict(Source):
    """A state dict already in memory (tests, and tools that built one), given as it is: not checked for
    NaN/Inf, so that a test can write a broken checkpoint on purpose."""

    def __init__(self, state: dict, cfg: ModelConfig, info: dict | None = None):
        self.state, self.cfg, self.info = state, cfg, dict(info or {})
        self.entries = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
        self.where = "the state dict"

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


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


class MegatronGLM(Source):
    """A glm-pretrain (or glm-convert) checkpoint on any TP x PP layout.

    The weights as saved (the module, in the run's precision); ZeRO-3 keeps none in its module
    files, so there, and with ``masters``, they are the fp32 master weights from the optimizer
    partitions (any ZeRO stage >= 1), as DeepSpeed's ``zero_to_fp32`` consolidates them.
    """

    def __init__(self, path: str, trust: bool = False, masters: bool = False):
        self.opener = (MegatronGLM, path, trust, masters)
        try:
            load, tag = ckpt.locate(path)
            meta = ckpt.read_meta(load, tag)
            zero = ckpt.settings_of(meta).parallel.zero_stage
            self.where = os.path.join(load, tag)
            if masters and not zero:
                raise ConversionError(
                    f"{self.where} was saved without ZeRO (--zero-stage 0): its weights are already "
                    "whole; use `glm-convert reshard` or `export-hf`"
                )
            if masters or zero == 3:
                state = SavedTrainingState(self.where, meta, trust)
                self.entries = {n: (state.shape(n), torch.float32) for n in state.names()}
                self._whole = lambda name: state.whole(name, "fp32")
            else:
                reader = ShardReader(self.where, trust)
                self.entries = {n: reader.entry(n) for n in reader.names()}
                self._whole = reader.full
        except ckpt.CheckpointError as e:
            raise ConversionError(str(e)) from None
        self.cfg, self.info = ModelConfig.from_dict(meta["model"]), _info(meta)

    def _read(self, name: str) -> torch.Tensor:
        return self._whole(name)


THUDM_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


class THUDM(Source):
    """An original GLM checkpoint (THUDM/GLM): ``mp_rank_XX_model_states.pt`` files, any model parallelism."""

    def __init__(
        self,
        path: str,
        num_attention_heads: int | None = None,
        preset_name: str | None = None,
        trust: bool = False,
    ):
        self.opener = (THUDM, path, num_attention_heads, preset_name, trust)
        self.where = path
        files = self._files(path)
        self.shards = []
        for f in files:
            mapped = MappedFile(f, trust)
            sd = mapped.value.get("module", mapped.value)
            if not isinstance(sd, dict):
                raise ConversionError(f"{f}: no state dict under 'module'")
            local = {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}
            self.shards.append((mapped, local))
        names = set(self.shards[0][1])
        for i, (_, s) in enumerate(self.shards[1:], 1):
            if set(s) != names:
                raise ConversionError(
                    f"mp_rank_{i:02d} holds other tensors than mp_rank_00: {sorted(set(s) ^ names)[:8]}"
                )
        mp = len(self.shards)
        self.entries = {
            name: (
                unsharded_shape(
                    self.shards[0][1][name].shape, partition_of(name) if mp > 1 else None, mp
                ),
                self.shards[0][1][name].dtype,
            )
            for name in sorted(names)
        }
        self.cfg = self._config(path, num_attention_heads, preset_name)
        self.info = {
            "tokenizer": None,
            "iteration": 0,
            "consumed_samples": 0,
            "source_layout": (mp, 1),
        }

    @staticmethod
    def _files(path: str) -> list[str]:
        files = (
            sorted(glob.glob(os.path.join(path, "**", "mp_rank_*_model_states.pt"), recursive=True))
            if os.path.isdir(path)
            else [path]
        )
        latest = os.path.join(path, "latest_checkpointed_iteration.txt")
        if os.path.isdir(path) and os.path.exists(latest):
            with open(latest) as f:
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
        numbers = [int(re.search(r"mp_rank_(\d+)", os.path.basename(f)).group(1)) for f in files]
        if numbers != list(range(len(files))):
            raise ConversionError(
                f"model-parallel files {numbers} in {sorted(folders)}: some are missing"
            )
        return files

    def _config(self, path: str, heads: int | None, preset_name: str | None) -> ModelConfig:
        shape = {name: shape for name, (shape, _) in self.entries.items()}
        if "word_embeddings.weight" not in shape:
            raise ConversionError(f"{path}: no word_embeddings.weight: not a GLM checkpoint")
        layers = {int(m.group(1)) for m in map(THUDM_LAYER.match, shape) if m}
        base = preset(preset_name) if preset_name else None
        heads = heads or (base.num_attention_heads if base else None)
        if heads is None:
            raise ConversionError(
                "the number of attention heads is not in the weights: pass --num-attention-heads "
                "or --preset"
            )
        vocab, hidden = shape["word_embeddings.weight"]
        mlp = shape.get("transformer.layers.0.mlp.dense_h_to_4h.weight")
        positions = shape.get("transformer.position_embeddings.weight")
        cfg = ModelConfig(
            num_layers=len(layers),
            hidden_size=hidden,
            num_attention_heads=heads,
            vocab_size=vocab,
            ffn_hidden_size=mlp[0] if mlp else None,
            max_position_embeddings=positions[0] - 1 if positions else 512,
        )
        # the heads are not in the weights: a preset that disagrees on any size is the wrong one
        if base is not None:
            wrong = [
                f"{name} {getattr(base, name)} (the weights have {getattr(cfg, name)})"
                for name in (
                    "num_layers",
                    "hidden_size",
                    "ffn_hidden_size",
                    "max_position_embeddings",
                )
                if getattr(cfg, name) is not None and getattr(base, name) != getattr(cfg, name)
            ]
            if wrong:
                raise ConversionError(
                    f"--preset {preset_name} does not describe {path}: it has {'; '.join(wrong)}. "
                    "Pass the right --preset, or --num-attention-heads alone"
                )
        return cfg

    def _read(self, name: str) -> torch.Tensor:
        pieces = [mapped.copy(local[name], dtype=None) for mapped, local in self.shards]
        spec = partition_of(name)
        return pieces[0] if spec is None or len(pieces) == 1 else unshard_tensors(pieces, *spec)


class HuggingFace(Source):
    """An export-hf folder: safetensors files (one, or shards with their index) and ``config.json``."""

    def __init__(self, path: str):
        from safetensors import SafetensorError, safe_open

        self.opener = (HuggingFace, path)
        self.where = path
        config = self._config(path)
        self.files: dict[str, str] = {}  # tensor -> the file that holds it
        self.entries = {}
        for f in self._weight_files(path):
            try:
                with safe_open(f, framework="pt") as opened:
                    for name in opened.keys():
                        piece = opened.get_slice(name)
                        self.files[name] = f
                        self.entries[name] = (tuple(piece.get_shape()), _DTYPES[piece.get_dtype()])
            except (SafetensorError, OSError) as e:
                raise ConversionError(
                    f"{f}: not a readable safetensors file ({e}): truncated or corrupt; export it again"
                ) from None
        ours = config["megatron_glm"]
        tokenizer = ours.get("tokenizer")
        if tokenizer:  # the files travel with the folder
            tokenizer = {
                **tokenizer,
                "files": [os.path.join(path, os.path.basename(p)) for p in tokenizer["files"]],
            }
        # the run's settings (exports before they existed recorded its flags as training_args)
        settings = ckpt.settings_of(
            {
                "model": ours["model"],
                "settings": ours.get("settings"),
                "args": ours.get("training_args"),
            }
        ).record()
        self.cfg = ModelConfig.from_dict(ours["model"])
        self.info = {
            "tokenizer": tokenizer,
            "iteration": ours.get("iteration", 0),
            "consumed_samples": ours.get("consumed_samples", 0),
            "seq_length": ours.get("seq_length"),
            "settings": settings,
        }

    @staticmethod
    def _config(path: str) -> dict:
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
        return config

    @staticmethod
    def _weight_files(path: str) -> list[str]:
        index = os.path.join(path, "model.safetensors.index.json")
        if not os.path.exists(index):
            return sorted(glob.glob(os.path.join(path, "*.safetensors")))
        with open(index) as f:  # sharded: the index names every shard
            listed = sorted(set(json.load(f).get("weight_map", {}).values()))
        gone = [name for name in listed if not os.path.exists(os.path.join(path, name))]
        if gone:
            raise ConversionError(
                f"{path} is missing {len(gone)} of its {len(listed)} weight shards ({gone[0]}...): "
                "copy the whole export folder, or export it again"
            )
        return [os.path.join(path, name) for name in listed]

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        # opened for this one read: its mapping, and the pages it touched, go when it closes
        with safe_open(self.files[name], framework="pt") as opened:
            return opened.get_tensor(name)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
