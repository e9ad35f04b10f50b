"""Cross entropy over vocabulary-split logits, without ever gathering the full vocabulary.

Each rank holds logits for its vocabulary range. Three all-reduces over the TP group (the
max, the target's logit, the sum of exponentials) give the exact per-token loss; the
backward pass is local: ``softmax - onehot`` on this rank's range.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.parallel import state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):
        group = state.get_tensor_model_parallel_group()
        logits = logits.float()
        local_max = logits.max(dim=-1).values
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max[..., None]
        vocab = logits.shape[-1]
        start = state.get_tensor_model_parallel_rank() * vocab
        outside = (target < start) | (target >= start + vocab)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = (
            shifted.gather(-1, local_target[..., None]).squeeze(-1).masked_fill(outside, 0.0)
        )
        dist.all_reduce(predicted, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - predicted
        softmax = exp / sum_exp[..., None]
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local_target, outside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local_target[..., None], -(~outside).float()[..., None])
        return g * grad[..., None], None


def vocab_parallel_is_argmax(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Whether each target's logit is the largest of the whole vocabulary (a tie counts), from this rank's range:
    two all-reduces (the max, the target's logit) as in the cross entropy."""
    logits = logits.detach().float()
    if state.get_tensor_model_parallel_world_size() == 1:
        return logits.gather(-1, target[..., None]).squeeze(-1) >= logits.max(dim=-1).values
    group = state.get_tensor_model_parallel_group()
    best = logits.max(dim=-1).values
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    vocab = logits.shape[-1]
    start = state.get_tensor_model_parallel_rank() * vocab
    outside = (target < start) | (target >= start + vocab)
    mine = (
        logits.gather(-1, (target - start).masked_fill(outside, 0)[..., None])
        .squeeze(-1)
        .masked_fill(outside, 0.0)
    )
    dist.all_reduce(mine, group=group)
    return mine >= best


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss ``[...]`` from this rank's logits ``[..., V / tp]`` and global targets."""
    if state.get_tensor_model_parallel_world_size() == 1:
        return torch.nn.functional.cross_entropy(
            logits.float().flatten(0, -2), target.flatten(), reduction="none"
        ).view_as(target)
    return _VocabParallelCrossEntropy.apply(logits, target)
