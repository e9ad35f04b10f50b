"""The tied embedding across pipeline stages (Megatron's embedding group).

The first virtual stage owns the word embeddings; the last one needs the same matrix for the
logits. It keeps a copy that is not a parameter: its gradient is sent to the first stage,
which adds it to the embedding gradient before the optimizer step, and after every step the
first stage broadcasts the updated matrix back. So the optimizer sees one tied matrix,
exactly as without pipelining. (The chunks themselves come from the model's plan,
``model/parallelize.py``.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.parallel import state


class TiedEmbedding:
    """The gradient and weight traffic between the first and the last pipeline stage.

    A chunk offers ``output_weight()`` (the first stage's: the embedding parameter), and a last
    stage without it ``tied_weight_shape()`` and a ``tied_weight_copy`` slot.
    """

    def __init__(self, chunks, dtype=torch.float32):
        self.pp = state.get_pipeline_model_parallel_world_size()
        self.first_chunk = chunks[0] if state.is_pipeline_first_stage() else None
        self.last_chunk = chunks[-1] if state.is_pipeline_last_stage() else None
        ranks = state._require()["pp_ranks"] if self.pp > 1 else None
        self.first_rank, self.last_rank = (ranks[0], ranks[-1]) if ranks else (None, None)
        # the copy, in the training dtype; broadcast_weight fills it
        if self.active and self.last_chunk is not None:
            chunk = self.last_chunk
            chunk.tied_weight_copy = torch.empty(
                chunk.tied_weight_shape(),
                dtype=dtype,
                device=next(chunk.parameters()).device,
                requires_grad=True,
            )

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
        incoming = torch.empty(
            weight.shape,
            dtype=weight.grad.dtype if weight.grad is not None else weight.dtype,
            device=weight.device,
        )
        dist.recv(incoming, self.last_rank)
        if weight.grad is None:
            weight.grad = incoming.to(weight.dtype)
        else:
            weight.grad += incoming.to(weight.grad.dtype)

    def broadcast_weight(self) -> None:
        """After each optimizer step (and after loading): the last stage's copy := the first stage's matrix."""
        if not self.active or (self.first_chunk is None and self.last_chunk is None):
            return  # a middle stage holds neither end of the tied matrix
        group = state.get_embedding_group()
        if self.first_chunk is not None:
            w = self.first_chunk.output_weight().detach()
            dist.broadcast(w.contiguous(), self.first_rank, group=group)
        elif self.last_chunk is not None:
            w = self.last_chunk.tied_weight_copy
            with torch.no_grad():
                dist.broadcast(w.data, self.first_rank, group=group)
