"""``apply_pp``: cut a GLM model into this rank's pipeline chunks, and keep the tied embedding tied.

Chunk ``c`` of rank ``r`` runs the layers of virtual stage ``c * pp + r`` (``partition_layers``).
The first virtual stage owns the word embeddings; the last one needs the same matrix for the
logits. It keeps a copy that is not a parameter: its gradient is sent to the first stage,
which adds it to the embedding gradient before the optimizer step, and after every step the
first stage broadcasts the updated matrix back (Megatron's embedding group). So the optimizer
sees one tied matrix, exactly as without pipelining.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.parallel import state
from megatron_glm.parallel.pipeline import partition_layers


def _chunk_of(full, layer_ids: range, pre: bool, post: bool):
    chunk = type(full).__new__(type(full))
    nn.Module.__init__(chunk)
    chunk.cfg = full.cfg
    chunk.pre_process, chunk.post_process = pre, post
    chunk.layer_offset = layer_ids.start
    transformer = type(full.transformer).__new__(type(full.transformer))
    nn.Module.__init__(transformer)
    transformer.layers = nn.ModuleList(full.transformer.layers[i] for i in layer_ids)
    transformer.embedding_dropout = full.transformer.embedding_dropout
    if pre and full.cfg.position_embedding_type == "learned_2d":
        transformer.position_embeddings = full.transformer.position_embeddings
        transformer.block_position_embeddings = full.transformer.block_position_embeddings
    if post:
        transformer.final_layernorm = full.transformer.final_layernorm
    chunk.transformer = transformer
    if pre:
        chunk.word_embeddings = full.word_embeddings
    if post:
        chunk.output_layer = full.output_layer
        if not pre:
            chunk.tied_weight_copy = full.word_embeddings.weight.detach().clone().requires_grad_()
    return chunk


def apply_pp(full, vpp: int = 1, explicit: list[int] | None = None) -> list:
    """This rank's chunks (a list of length ``vpp``); PP=1 returns ``[full]`` unchanged."""
    pp = state.get_pipeline_model_parallel_world_size()
    if pp == 1 and vpp == 1:
        return [full]
    rank = state.get_pipeline_model_parallel_rank()
    ranges = partition_layers(full.cfg.num_layers, pp, vpp, explicit)[rank]
    return [_chunk_of(full, ranges[c], rank == 0 and c == 0, rank == pp - 1 and c == vpp - 1)
            for c in range(vpp)]


class TiedEmbedding:
    """The gradient and weight traffic between the first and the last pipeline stage."""

    def __init__(self, chunks, dtype=torch.float32):
        self.pp = state.get_pipeline_model_parallel_world_size()
        self.first_chunk = chunks[0] if state.is_pipeline_first_stage() else None
        self.last_chunk = chunks[-1] if state.is_pipeline_last_stage() else None
        ranks = state._require()["pp_ranks"] if self.pp > 1 else None
        self.first_rank, self.last_rank = (ranks[0], ranks[-1]) if ranks else (None, None)
        if self.active and self.last_chunk is not None:  # the copy travels in the training dtype
            copy = self.last_chunk.tied_weight_copy
            self.last_chunk.tied_weight_copy = copy.detach().to(dtype).requires_grad_()

    @property
    def active(self) -> bool:
        return self.pp > 1

    def send_grad(self) -> None:
        """Last stage, after its last backward of the step: ship the copy's gradient."""
        if not self.active or self.last_chunk is None:
            return
        w = self.last_chunk.tied_weight_copy
        grad = w.grad if w.grad is not None else torch.zeros_like(w)
        dist.send(grad.contiguous(), self.first_rank)
        w.grad = None

    def recv_grad_into(self, weight: torch.Tensor) -> None:
        """First stage, before the engine reduces gradients: add the last stage's contribution."""
        if not self.active or self.first_chunk is None:
            return
        incoming = torch.empty(weight.shape, dtype=weight.grad.dtype if weight.grad is not None else weight.dtype,
                               device=weight.device)
        dist.recv(incoming, self.last_rank)
        if weight.grad is None:
            weight.grad = incoming.to(weight.dtype)
        else:
            weight.grad += incoming.to(weight.grad.dtype)

    def broadcast_weight(self) -> None:
        """After each optimizer step (and after loading): the last stage's copy := the first stage's matrix."""
        if not self.active:
            return
        group = state.get_embedding_group()
        if self.first_chunk is not None:
            w = self.first_chunk.word_embeddings.weight.detach()
            dist.broadcast(w.contiguous(), self.first_rank, group=group)
        elif self.last_chunk is not None:
            w = self.last_chunk.tied_weight_copy
            with torch.no_grad():
                dist.broadcast(w.data, self.first_rank, group=group)
