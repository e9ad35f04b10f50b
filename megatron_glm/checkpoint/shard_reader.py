"""One rank's weights for any TP x PP layout, read from a checkpoint saved on any other.

Every source file is memory-mapped; a parameter is copied out of its source TP shards (their pages
handed back), merged, and sliced to the target rank's shard, one parameter at a time. A rank so
holds its own shard and at most one whole parameter, never the model (glm-eval's tensor and
pipeline parallelism); glm-convert reads whole parameters the same way.
"""

from __future__ import annotations

import os

import torch

from megatron_glm import serialization
from megatron_glm.checkpoint.format import (
    CheckpointError,
    locate,
    model_file,
    read_meta,
    settings_of,
)
from megatron_glm.checkpoint.mapped import MappedFile
from megatron_glm.checkpoint.weights import _global_name, _module_of
from megatron_glm.model.parallelize import RankLayout, partition_of
from megatron_glm.parallel.tensor_parallel import shard_tensor, unshard_tensors, unsharded_shape


class ShardReader:
    """The weights of a megatron-glm checkpoint (a folder, or one ``iter_N`` in it), per target rank."""

    def __init__(self, path: str, trust: bool = False):
        self.load_dir, self.tag = locate(path)
        self.meta = read_meta(self.load_dir, self.tag)
        if settings_of(self.meta).parallel.zero_stage == 3:
            raise CheckpointError(
                f"{self.load_dir}/{self.tag} holds ZeRO-3 partitions, not whole weights: consolidate them "
                "first (glm-convert zero-to-fp32)"
            )
        self.trust = trust
        self.folder = os.path.join(self.load_dir, self.tag)
        self.tp = self.meta.get("tensor_model_parallel_size", 1)
        self.pp = self.meta.get("pipeline_model_parallel_size", 1)
        self.geglu = self.meta["model"].get("geglu", False)
        self._files: dict[tuple[int, int], tuple[MappedFile, dict]] = {}
        self.where: dict[str, tuple[int, str]] = {}  # global name -> (source stage, its name there)
        for p in range(self.pp):
            ranges = self.meta["pipeline_layers"][p] if self.pp > 1 else None
            for name in self._shard(p, 0):
                self.where.setdefault(_global_name(name, ranges), (p, name))

    def __str__(self) -> str:
        return f"{self.load_dir}/{self.tag}"

    def _file(self, p: int, t: int) -> tuple[MappedFile, dict]:
        if (p, t) not in self._files:
            file = MappedFile(model_file(self.folder, p, t, self.tp), self.trust)
            self._files[(p, t)] = file, _module_of(file.value, file.path)
        return self._files[(p, t)]

    def _shard(self, p: int, t: int) -> dict:
        return self._file(p, t)[1]

    def _read(self, p: int, t: int, local: str) -> torch.Tensor:
        file, module = self._file(p, t)
        return file.copy(module[local], dtype=None)

    def names(self) -> list[str]:
        return sorted(self.where)

    def _where(self, name: str) -> tuple[int, str]:
        if name not in self.where:
            raise CheckpointError(f"{self} holds no {name}: it is not a checkpoint of this model")
        return self.where[name]

    def entry(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """The whole parameter's shape and saved dtype, without reading it."""
        p, local = self._where(name)
        saved = self._shard(p, 0)[local]
        return unsharded_shape(saved.shape, partition_of(name, self.geglu), self.tp), saved.dtype

    def full(self, name: str) -> torch.Tensor:
        """The whole parameter ``name`` (single-model numbering, its saved dtype), merged from its source shards."""
        p, local = self._where(name)
        spec = partition_of(name, self.geglu)
        if spec is None or self.tp == 1:
            return self._read(p, 0, local)
        return unshard_tensors([self._read(p, t, local) for t in range(self.tp)], *spec)

    def weights(self, layout: RankLayout):
        """``build_rank_model``'s ``weights``: this rank's state dict for its meta chunks, and where it came from."""

        def read(chunks):
            out = {}
            several = len(chunks) > 1
            for c, chunk in enumerate(chunks):
                for name, meta in chunk.state_dict().items():
                    full_name = chunk.full_name(name)
                    full = self.full(full_name)
                    spec = partition_of(full_name, self.geglu) if layout.tp > 1 else None
                    # full is a copy already; a shard is cut into its own (cat) buffer
                    value = shard_tensor(full, *spec, layout.tp_rank, layout.tp) if spec else full
                    if value.shape != meta.shape:
                        raise CheckpointError(
                            f"{self}: {full_name} has shape {tuple(full.shape)}, which does not split into this "
                            f"rank's {tuple(meta.shape)}"
                        )
                    out[f"{c}.{name}" if several else name] = value.float()
            serialization.check_finite(out.items(), str(self))
            return out, str(self)

        return read
