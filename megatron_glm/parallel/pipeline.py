"""Pipeline parallelism: layer partitioning, point-to-point exchange, and Megatron's schedules.

- ``forward_backward_no_pipelining``: gradient accumulation over micro-batches (PP = 1);
- ``forward_backward_pipelining_without_interleaving``: 1F1B (PipeDream-flush): a warm-up of
  forwards, then one forward and one backward alternately, then a cool-down of backwards;
  at most ``pp - rank`` micro-batches' activations are alive on a stage;
- ``forward_backward_pipelining_with_interleaving``: 1F1B over ``v`` model chunks per rank
  (virtual stages), which divides the bubble by ``v``.

A schedule calls ``forward_step(chunk, micro_batch, input)`` (returns the output, or the loss
on the last stage) and ``backward_step(chunk, input, output, output_grad)`` (returns the
input's gradient). Activations travel between neighbouring stages with batched isend/irecv,
so a send and a receive that wait on each other never deadlock. An output is freed (its
storage released, the autograd graph kept) once it has been sent (Megatron's
``deallocate_output_tensor``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.parallel import state


# -- partitioning ------------------------------------------------------------------------
def partition_layers(
    num_layers: int, pp: int, vpp: int = 1, explicit: list[int] | None = None
) -> list[list[range]]:
    """``ranges[stage][chunk]``: the global layer ids each pipeline rank runs, chunk by chunk.

    Uniform by default; ``explicit`` gives the layer count of every virtual stage in order
    (``pp * vpp`` numbers). Virtual stage ``c * pp + stage`` is chunk ``c`` of rank ``stage``.
    """
    stages = pp * vpp
    if explicit is not None:
        if len(explicit) != stages or sum(explicit) != num_layers or min(explicit) < 1:
            raise ValueError(
                f"--pipeline-layers {explicit}: need {stages} positive counts adding up to "
                f"--num-layers {num_layers}"
            )
        counts = list(explicit)
    else:
        if num_layers % stages:
            raise ValueError(
                f"--num-layers {num_layers} is not divisible by pipeline stages {pp} x virtual stages "
                f"{vpp}; change --num-layers-per-virtual-pipeline-stage or give --pipeline-layers"
            )
        counts = [num_layers // stages] * stages
    starts = [sum(counts[:i]) for i in range(stages)]
    return [
        [range(starts[c * pp + s], starts[c * pp + s] + counts[c * pp + s]) for c in range(vpp)]
        for s in range(pp)
    ]


def stage_layer_counts(
    num_layers: int,
    pp: int,
    vpp: int = 1,
    first: int | None = None,
    last: int | None = None,
    embedding: bool = False,
    loss: bool = False,
) -> list[int] | None:
    """Layer counts of the ``pp * vpp`` virtual stages (``partition_layers``' order) for Megatron's
    uneven splits, or None for the uniform one.

    ``first``/``last`` (``--decoder-first/last-pipeline-num-layers``) give the first and last
    pipeline rank their layers and split the rest evenly over the ranks between them;
    ``embedding``/``loss`` (``--account-for-embedding/loss-in-pipeline-split``) count the input
    embedding (the output layer and loss) as one layer of the first (last) rank's first (last)
    chunk, which then holds one transformer layer fewer. With ``vpp`` chunks per rank, a rank's
    layers split evenly over its chunks. ``ValueError`` names the flags of a split that cannot be made.
    """
    if first is None and last is None and not embedding and not loss:
        return None
    uneven = "--decoder-first/last-pipeline-num-layers"
    if pp < 2:
        raise ValueError(
            f"{uneven} and --account-for-*-in-pipeline-split need --pipeline-model-parallel-size > 1"
        )
    if (first is not None or last is not None) and (embedding or loss):
        raise ValueError(
            f"{uneven} and --account-for-embedding/loss-in-pipeline-split are two ways to split the "
            "layers unevenly (as in Megatron): pass one"
        )
    if first is not None or last is not None:
        ends = [n for n in (first, last) if n is not None]
        if min(ends) < 1:
            raise ValueError(f"{uneven}: each given stage needs at least one layer")
        between = pp - len(ends)
        rest = num_layers - sum(ends)
        if rest < between or (between == 0 and rest != 0) or (between and rest % between):
            raise ValueError(
                f"--num-layers {num_layers} minus {uneven} ({'+'.join(map(str, ends))}) leaves {rest} "
                f"layers for the {between} stage(s) between, which must split them evenly (at least one each)"
            )
        middle = rest // between if between else 0
        ranks = [first if first is not None else middle] + [middle] * (pp - 2)
        ranks.append(last if last is not None else middle)
        for rank, count in enumerate(ranks):
            if count % vpp:
                raise ValueError(
                    f"pipeline stage {rank} gets {count} layers, not divisible into {vpp} virtual stages "
                    "(Megatron's rule for uneven splits)"
                )
        return [ranks[s] // vpp for c in range(vpp) for s in range(pp)]
    units = num_layers + embedding + loss
    if units % (pp * vpp):
        what = " + ".join(["--num-layers"] + ["the embedding"] * embedding + ["the loss"] * loss)
        raise ValueError(
            f"{what} = {units} does not split evenly into --pipeline-model-parallel-size {pp}"
            + (f" x {vpp} virtual stages" if vpp > 1 else "")
        )
    counts = [units // (pp * vpp)] * (pp * vpp)
    counts[0] -= embedding
    counts[-1] -= loss
    if min(counts) < 1:
        raise ValueError(
            f"--num-layers {num_layers} leaves a pipeline stage with no layer after the embedding/loss"
        )
    return counts


# -- point to point ----------------------------------------------------------------------
def _neighbours():
    ranks = state._require()["pp_ranks"]
    i = state.get_pipeline_model_parallel_rank()
    return ranks[(i - 1) % len(ranks)], ranks[(i + 1) % len(ranks)]


# message tags: with 2 stages (and rings), prev and next are the same rank
ACTIVATION, GRADIENT = (
    1,
    2,
)


def communicate(
    send_next=None,
    send_prev=None,
    recv_prev: bool = False,
    recv_next: bool = False,
    shape=None,
    dtype=None,
):
    """One batched exchange with the neighbours; returns ``(from_prev, from_next)``.

    Activations flow forward and gradients backward under different tags, so when the
    previous and the next stage are the same rank a gradient is never taken for an activation.
    """
    prev, nxt = _neighbours()
    ops, from_prev, from_next = [], None, None
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), prev, tag=GRADIENT))
    if recv_prev:
        from_prev = torch.empty(shape, dtype=dtype, device=_device())
        ops.append(dist.P2POp(dist.irecv, from_prev, prev, tag=ACTIVATION))
    if send_next is not None:
        ops.append(dist.P2POp(dist.isend, send_next.contiguous(), nxt, tag=ACTIVATION))
    if recv_next:
        from_next = torch.empty(shape, dtype=dtype, device=_device())
        ops.append(dist.P2POp(dist.irecv, from_next, nxt, tag=GRADIENT))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return from_prev, from_next


def _device():
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def backward_from(out: torch.Tensor, grad: torch.Tensor) -> None:
    """``out.backward(grad)`` for an output whose storage ``deallocate`` freed.

    The public ``torch.autograd.backward`` compares the gradient's shape with the (now
    one-element) tensor; the engine itself only needs the graph, which kept the real shape.
    """
    torch.autograd.Variable._execution_engine.run_backward(
        (out,), (grad,), False, False, (), True, True
    )


def deallocate(out) -> None:
    """Free an output's storage after it was sent; its ``grad_fn`` (what backward needs) stays."""
    if out is not None and out.grad_fn is not None and out.numel() > 1:
        out.data = torch.empty((1,), device=out.device, dtype=out.dtype)


# -- schedules ---------------------------------------------------------------------------
def forward_backward_no_pipelining(
    forward_step, backward_step, chunks, num_microbatches: int, forward_only: bool = False, **_
):
    for m in range(num_microbatches):
        out = forward_step(chunks[0], m, None)
        if not forward_only:
            backward_step(chunks[0], None, out, None)


def forward_backward_pipelining_without_interleaving(
    forward_step,
    backward_step,
    chunks,
    num_microbatches: int,
    shape,
    dtype,
    forward_only: bool = False,
):
    rank, pp = (
        state.get_pipeline_model_parallel_rank(),
        state.get_pipeline_model_parallel_world_size(),
    )
    first, last = rank == 0, rank == pp - 1
    chunk = chunks[0]
    warmup = num_microbatches if forward_only else min(pp - rank - 1, num_microbatches)
    remaining = num_microbatches - warmup
    inputs, outputs = [], []

    def recv_forward():
        return (
            None
            if first
            else communicate(recv_prev=True, shape=shape, dtype=dtype)[0].requires_grad_()
        )

    def send_forward(out):
        if not last:
            communicate(send_next=out.detach())

    for m in range(warmup):
        inp = recv_forward()
        out = forward_step(chunk, m, inp)
        send_forward(out)
        if not forward_only:
            inputs.append(inp)
            outputs.append(out)
            if not last:
                deallocate(out)
    inp = recv_forward() if remaining else None
    for i in range(remaining):
        m = warmup + i
        out = forward_step(chunk, m, inp)
        out_grad = (
            None
            if last
            else communicate(send_next=out.detach(), recv_next=True, shape=shape, dtype=dtype)[1]
        )
        inputs.append(inp)
        outputs.append(out)
        if not last:
            deallocate(out)
        inp, out = inputs.pop(0), outputs.pop(0)
        in_grad = backward_step(chunk, inp, out, out_grad)
        if i == remaining - 1:
            inp = None
            if not first:
                communicate(send_prev=in_grad)
        elif first:
            inp = None
        else:
            inp = communicate(send_prev=in_grad, recv_prev=True, shape=shape, dtype=dtype)[
                0
            ].requires_grad_()
    if forward_only:
        return
    for _ in range(warmup):
        inp, out = inputs.pop(0), outputs.pop(0)
        out_grad = None if last else communicate(recv_next=True, shape=shape, dtype=dtype)[1]
        in_grad = backward_step(chunk, inp, out, out_grad)
        if not first:
            communicate(send_prev=in_grad)


def forward_backward_pipelining_with_interleaving(
    forward_step,
    backward_step,
    chunks,
    num_microbatches: int,
    shape,
    dtype,
    forward_only: bool = False,
):
    """Megatron's interleaved 1F1B: rank ``r`` holds chunks ``0..v-1`` = virtual stages ``c * pp + r``.

    Activations go round a ring (the last rank's chunk ``c`` feeds rank 0's chunk ``c + 1``).
    The bookkeeping of which chunk a received tensor belongs to follows Megatron's schedule.
    """
    rank, pp = (
        state.get_pipeline_model_parallel_rank(),
        state.get_pipeline_model_parallel_world_size(),
    )
    v = len(chunks)
    if num_microbatches % pp:
        raise ValueError(
            f"the interleaved schedule needs the number of micro-batches ({num_microbatches}) to be a "
            f"multiple of --pipeline-model-parallel-size {pp}"
        )
    total = num_microbatches * v
    first_rank, last_rank = rank == 0, rank == pp - 1
    all_warmup = num_microbatches == pp
    warmup = total if forward_only or all_warmup else min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    remaining = total - warmup
    inputs, outputs, grads = [[] for _ in range(v)], [[] for _ in range(v)], [[] for _ in range(v)]

    def chunk_id(k: int, forward: bool) -> int:
        c = (k % (pp * v)) // pp
        return c if forward else v - 1 - c

    def micro_id(k: int) -> int:
        group, within = divmod(k, pp * v)
        return group * pp + within % pp

    def forward_helper(k: int):
        c = chunk_id(k, True)
        if first_rank and c == 0 and len(inputs[c]) == len(outputs[c]):
            # the first virtual stage reads data, nothing was received for it
            inputs[c].append(None)
        inp = inputs[c][len(outputs[c])]
        out = forward_step(chunks[c], micro_id(k), inp)
        outputs[c].append(out)
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return out

    def backward_helper(k: int):
        c = chunk_id(k, False)
        if last_rank and c == v - 1 and not grads[c]:
            grads[c].append(None)
        inp, out, grad = inputs[c].pop(0), outputs[c].pop(0), grads[c].pop(0)
        return backward_step(chunks[c], inp, out, grad)

    def received(t):
        return None if t is None else t.requires_grad_()

    inputs[0].append(
        None if first_rank else received(communicate(recv_prev=True, shape=shape, dtype=dtype)[0])
    )
    for k in range(warmup):
        out = forward_helper(k)
        send = None if (last_rank and chunk_id(k, True) == v - 1) else out.detach()
        nxt = chunk_id(k + 1, True)
        recv_prev = not (first_rank and nxt == 0) and k != total - 1
        recv_next = k == warmup - 1 and not forward_only and not all_warmup and not last_rank
        from_prev, from_next = communicate(
            send_next=send, recv_prev=recv_prev, recv_next=recv_next, shape=shape, dtype=dtype
        )
        if send is not None and not forward_only:
            deallocate(out)
        if k == warmup - 1 and not forward_only and not all_warmup:
            grads[v - 1].append(from_next)
        if k != total - 1:
            inputs[nxt].append(received(from_prev))
    for i in range(remaining):
        kf, kb = warmup + i, i
        out = forward_helper(kf)
        in_grad = backward_helper(kb)
        send_next = None if (last_rank and chunk_id(kf, True) == v - 1) else out.detach()
        send_prev = None if (first_rank and chunk_id(kb, False) == 0) else in_grad
        recv_prev = True
        if first_rank:
            next_f = chunk_id(kf - (pp - 1), True)
            recv_prev = next_f != v - 1
            next_f += 1
        else:
            next_f = chunk_id(kf + 1, True)
        recv_next = True
        if last_rank:
            next_b = chunk_id(kb - (pp - 1), False)
            recv_next = next_b != 0
            next_b -= 1
        else:
            next_b = chunk_id(kb + 1, False)
        if i == remaining - 1:
            recv_prev = False
        from_prev, from_next = communicate(
            send_next=send_next,
            send_prev=send_prev,
            recv_prev=recv_prev,
            recv_next=recv_next,
            shape=shape,
            dtype=dtype,
        )
        if send_next is not None:
            deallocate(out)
        if recv_prev:
            inputs[next_f].append(received(from_prev))
        if recv_next:
            grads[next_b].append(from_next)
    if forward_only:
        return
    if all_warmup:
        grads[v - 1].append(
            None if last_rank else communicate(recv_next=True, shape=shape, dtype=dtype)[1]
        )
    for k in range(remaining, total):
        in_grad = backward_helper(k)
        send_prev = None if (first_rank and chunk_id(k, False) == 0) else in_grad
        nxt = chunk_id(k + 1, False)
        recv_next = not (last_rank and nxt == v - 1) and k != total - 1
        _, from_next = communicate(
            send_prev=send_prev, recv_next=recv_next, shape=shape, dtype=dtype
        )
        if k != total - 1:
            grads[nxt].append(from_next)


def get_schedule(pp: int, vpp: int):
    if pp == 1:
        return forward_backward_no_pipelining
    if vpp > 1:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving
