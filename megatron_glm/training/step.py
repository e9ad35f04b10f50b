"""One optimizer step (or one validation pass) over a global batch, through the pipeline schedule.

The DeepSpeed engine sees one ``backward`` per micro-batch and model chunk; its optimizer step
(and the gradient-norm all-reduce across stages that clipping needs) runs after the schedule
has finished on every stage, never in the middle of it, where it would wait on a stage that
waits on us. The last stage's loss goes through ``engine.backward``; other stages run their
backward from the received gradient (``backward_from``, which works on freed outputs) and
then give the engine an empty ``backward`` so its accumulation, gradient reduction and mixed
precision bookkeeping run as usual. Losses are divided by the accumulation count here, so
the engine is told not to scale them again.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from megatron_glm.data.blank_infilling import OBJECTIVES
from megatron_glm.parallel import state
from megatron_glm.parallel.pipeline import backward_from, get_schedule


def gradient_norm(params) -> float:
    """Global gradient norm, each parameter counted once (``state.mark_for_gradient_norm``)."""
    counted_everywhere = (
        state.get_model_parallel_rank() == 0 if state.model_parallel_is_initialized() else True
    )
    total = torch.zeros(1, dtype=torch.float64)
    for p in params:
        if p.grad is not None and (getattr(p, "model_parallel", False) or counted_everywhere):
            total += p.grad.detach().double().pow(2).sum().cpu()
    if state.model_parallel_is_initialized() and state.get_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=state.get_model_parallel_group())
    return float(total.sqrt())


class StepRunner:
    """Runs a global batch's micro-batches through this rank's chunks with the layout's pipeline schedule.

    ``train`` is one optimizer step (losses, gradient norm), ``evaluate`` a validation loss and
    ``score`` per-row scores for the zero-shot tasks; ``shape`` is the activation a stage sends
    (micro-batch, local sequence, hidden), ``tied`` keeps the first and last stage's embeddings one.
    ``objective``: fine-tuning's loss and scores (``model/cloze.py``) instead of pretraining's, whose
    losses per blank-infilling objective are then not reported.
    """

    def __init__(self, engine, chunks, tied, vpp: int, shape, dtype, device, objective=None):
        self.engine, self.chunks, self.tied = engine, chunks, tied
        self.shape, self.dtype, self.device = shape, dtype, device
        self.objective = objective
        self.pp = state.get_pipeline_model_parallel_world_size()
        self.schedule = get_schedule(self.pp, vpp)
        self.params = [p for c in chunks for p in c.parameters() if p.requires_grad]

    def _run(
        self,
        batches,
        forward_only: bool,
        overflow: bool = False,
        collect: dict | None = None,
        scorer=None,
    ):
        # loss sum, loss count, then (sum, tokens) per objective
        stats = np.zeros(2 + 2 * len(OBJECTIVES))
        engine, calls = self.engine, [0]
        total_calls = len(batches) * len(self.chunks)
        norm = [None]

        # without pipelining the engine runs the forward (ZeRO-3 gathers parameters and resets its
        # prefetching there); pipeline chunks are called directly (ZeRO-3 is refused with pipelining)
        call = (
            (lambda c, *a, **k: engine(*a, **k))
            if len(self.chunks) == 1 and self.pp == 1
            else (lambda c, *a, **k: c(*a, **k))
        )

        def forward_step(chunk, m, hidden):
            b = batches[m]
            out = call(
                chunk,
                b["tokens"],
                b["position_ids"],
                b["attn_lo"],
                b["attn_hi"],
                hidden_states=hidden,
            )
            if not chunk.post_process:
                return out
            # evaluation tasks: each row's score, and no loss (forward only)
            if collect is not None:
                collect[m] = scorer(chunk, out, b)
                return out
            sums = counts = None
            if self.objective is not None:
                loss = self.objective.loss(chunk, out, b)
            else:
                loss, sums, counts = chunk.loss(out, b["labels"], b["loss_mask"])
            if overflow:  # fault injection: an fp16 overflow, as a too-large loss scale would cause
                loss = loss * float("inf")
            stats[0] += float(loss.detach())
            stats[1] += 1
            if sums is not None:
                for obj, s, c in zip(b["objective"].tolist(), sums.tolist(), counts.tolist()):
                    stats[2 + 2 * obj] += s
                    stats[3 + 2 * obj] += c
            return loss

        def backward_step(chunk, hidden, out, out_grad):
            calls[0] += 1
            last = calls[0] == total_calls
            # the step's own count decides where it ends (a ramping batch changes it), not the engine's
            engine.set_gradient_accumulation_boundary(last)
            if out_grad is None:
                engine.backward(out / len(batches), scale_wrt_gas=False)
            else:
                backward_from(out, out_grad)
                if last and self.tied.active and self.tied.first_chunk is not None:
                    self.tied.recv_grad_into(self.tied.first_chunk.output_weight())
                # a loss with no parameters
                empty = torch.zeros((), requires_grad=True, device=self.device) * 1.0
                engine.backward(empty, scale_wrt_gas=False)
            # the engine counts micro-steps in step(); the real step waits for every stage
            if not last:
                engine.step()
            return hidden.grad if hidden is not None else None

        self.schedule(
            forward_step,
            backward_step,
            self.chunks,
            len(batches),
            shape=self.shape,
            dtype=self.dtype,
            forward_only=forward_only,
        )
        if not forward_only:
            # collectives across stages (gradient norm, clipping) only once every stage has finished
            self.tied.send_grad()
            norm[0] = gradient_norm(self.params)
            engine.step()
            self.tied.broadcast_weight()
        if self.pp > 1:  # the last stage has the losses; rank 0 logs
            t = torch.from_numpy(stats)
            dist.all_reduce(t, group=state.get_pipeline_model_parallel_group())
            stats = t.numpy()
        return stats, norm[0]

    def train(self, batches, inject_overflow: bool = False) -> dict:
        stats, norm = self._run(batches, forward_only=False, overflow=inject_overflow)
        # the global batch's loss, not this replica's share
        if state.get_data_parallel_world_size() > 1:
            t = torch.from_numpy(stats)
            dist.all_reduce(t, group=state.get_data_parallel_group())
            stats = t.numpy()
        reported = self.engine.get_global_grad_norm()
        out = {
            "lm_loss": stats[0] / max(stats[1], 1),
            "grad_norm": float(reported) if reported is not None else norm,
        }
        for k, name in enumerate(OBJECTIVES):
            if stats[3 + 2 * k]:
                out[f"loss_{name}"] = stats[2 + 2 * k] / stats[3 + 2 * k]
        return out

    def score(self, batches, scorer=None) -> list | None:
        """Each micro-batch's scores on the last pipeline stage, None on the others: per row (``GLMModel.score``),
        or what ``scorer(chunk, logits, batch)`` makes of them (a fine-tuning objective's ``score``)."""
        self.engine.eval()
        collected: dict = {}
        if scorer is None:

            def scorer(chunk, logits, b):
                return torch.stack(chunk.score(logits, b["labels"], b["loss_mask"]), dim=1)

        with torch.no_grad():
            self._run(batches, forward_only=True, collect=collected, scorer=scorer)
        self.engine.train()
        return [collected[m] for m in range(len(batches))] if collected else None

    def evaluate(self, batches) -> float:
        self.engine.eval()
        with torch.no_grad():
            stats, _ = self._run(batches, forward_only=True)
        self.engine.train()
        # each data-parallel rank saw its share of the samples
        if state.get_data_parallel_world_size() > 1:
            t = torch.from_numpy(stats)
            dist.all_reduce(t, group=state.get_data_parallel_group())
            stats = t.numpy()
        return sum(stats[2::2]) / max(sum(stats[3::2]), 1.0)


def spread_scores(runner: StepRunner, count: int, make, rows: int, width: int, scorer=None):
    """Score an evaluation's ``count`` micro-batches (``make(k)``, on the device, ``rows`` scored rows each) on
    any layout: micro-batch ``k`` on data-parallel rank ``k % dp``, scored on the last stage; ``[count * rows,
    width]`` float64 on every rank.

    ``count`` is a multiple of the data-parallel size (x the pipeline size under the interleaved schedule):
    with ZeRO-3 every replica gathers in each forward, and the pipeline's stages run the same schedule.
    """
    dp, dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
    mine = list(range(dp_rank, count, dp))
    scores = runner.score([make(k) for k in mine], scorer)
    full = torch.zeros(count * rows, width, dtype=torch.float64)
    for k, s in zip(mine, scores or []):
        full[k * rows : (k + 1) * rows] = s.double().cpu().reshape(rows, width)
    for size, group in (
        (dp, state.get_data_parallel_group),
        (runner.pp, state.get_pipeline_model_parallel_group),
    ):
        if size > 1:
            dist.all_reduce(full, group=group())
    return full


def score_count(items: int, per_batch: int, pp: int, vpp: int) -> int:
    """Micro-batches for ``items`` at ``per_batch`` each, rounded up to what ``spread_scores`` needs."""
    unit = state.get_data_parallel_world_size() * (pp if vpp > 1 else 1)
    return math.ceil(math.ceil(items / per_batch) / unit) * unit
