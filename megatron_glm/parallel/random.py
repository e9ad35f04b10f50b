"""Dropout randomness under tensor parallelism, and activation recomputation that restores it.

Replicated activations (the residual stream without sequence parallelism) must get the same
dropout mask on every tensor-parallel rank: they use the default generator, seeded alike
on all TP ranks. Activations split across TP ranks (attention heads, sequence-parallel
chunks) must get different masks: they run inside ``tracker.fork()``, a second RNG state
seeded with the TP rank. Recomputation replays a forward pass in the backward pass, so it
saves and restores both states around the replay (Megatron's ``CheckpointFunction``).
"""

from __future__ import annotations

import contextlib

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
_OFFSET = 2718


def _get_state():
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()


def _set_state(s):
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(s)
    else:
        torch.set_rng_state(s)


class RNGStatesTracker:
    """Named RNG states; ``fork(name)`` runs a block with that state, then puts the default back."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name} already exists")
        saved = _get_state()
        (torch.cuda.manual_seed if torch.cuda.is_available() else torch.manual_seed)(seed)
        self.states[name] = _get_state()
        _set_state(saved)

    def get_states(self) -> dict:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states:  # not set up (one process, no TP): the default generator serves
            yield
            return
        saved = _get_state()
        _set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state()
            _set_state(saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: int) -> None:
    """Default generator: ``seed`` on every TP rank; the tracker's: distinct per TP rank."""
    torch.manual_seed(seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _OFFSET + tp_rank)


class _Checkpoint(torch.autograd.Function):
    """Forward without keeping activations; backward recomputes them under the same RNG states."""

    @staticmethod
    def forward(ctx, run, *args):
        ctx.run = run
        ctx.cpu_state = torch.get_rng_state()
        ctx.cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        ctx.tracker_states = _TRACKER.get_states()
        ctx.save_for_backward(*[a for a in args if torch.is_tensor(a)])
        ctx.layout = [torch.is_tensor(a) for a in args]
        ctx.others = [a for a in args if not torch.is_tensor(a)]
        with torch.no_grad():
            return run(*args)

    @staticmethod
    def backward(ctx, *grads):
        args = []
        saved = list(ctx.saved_tensors)
        k = j = 0
        for is_tensor in ctx.layout:
            if is_tensor:
                t = saved[k]
                args.append(t.detach().requires_grad_(t.requires_grad))
                k += 1
            else:
                args.append(ctx.others[j])
                j += 1
        now_cpu, now_cuda, now_tracker = torch.get_rng_state(), None, _TRACKER.get_states()
        torch.set_rng_state(ctx.cpu_state)
        if ctx.cuda_state is not None:
            now_cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(ctx.cuda_state)
        _TRACKER.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                out = ctx.run(*args)
        finally:
            torch.set_rng_state(now_cpu)
            if now_cuda is not None:
                torch.cuda.set_rng_state(now_cuda)
            _TRACKER.set_states(now_tracker)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, *[a.grad if torch.is_tensor(a) and a.requires_grad else None for a in args])


def checkpoint(run, *args):
    """Run ``run(*args)`` keeping only its inputs; recompute it in the backward pass."""
    return _Checkpoint.apply(run, *args)
