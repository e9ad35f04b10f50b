"""Activation recomputation as wrapper modules, Megatron's flags (the model's plan applies them).

- ``full`` + ``uniform``: the layer stack in chunks of ``num_layers``; only each chunk's input
  is kept, the chunk is recomputed in the backward pass;
- ``full`` + ``block``: the first ``num_layers`` layers recomputed one by one, the rest stored;
- ``selective``: only a parameter-free piece (the core attention: scores, softmax, dropout) is
  recomputed.

Recomputation restores the default and the tensor-parallel RNG states, so dropout masks in
the replay equal the first pass (``parallel/random.py``).
"""

from __future__ import annotations

from torch import nn

from megatron_glm.parallel.random import checkpoint

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")


def check_recompute(granularity: str | None, method: str = "uniform", num_layers: int = 1) -> None:
    if granularity is None:
        return
    if granularity not in GRANULARITIES or method not in METHODS:
        raise ValueError(
            f"--recompute-granularity {granularity!r} / --recompute-method {method!r}: "
            f"choose from {GRANULARITIES} and {METHODS}"
        )
    if num_layers < 1:
        raise ValueError("--recompute-num-layers must be at least 1")


class Recompute(nn.Module):
    """Runs a stack of layers in training with full recomputation (``uniform`` or ``block``)."""

    def __init__(self, method: str, num_layers: int):
        super().__init__()
        check_recompute("full", method, num_layers)
        self.method, self.num_layers = method, num_layers

    def forward(self, layers, h, *args):
        layers = list(layers)

        def chunk(start, end):
            def run(x, *a):
                for layer in layers[start:end]:
                    x = layer(x, *a)
                return x

            return run

        if self.method == "uniform":
            for start in range(0, len(layers), self.num_layers):
                h = checkpoint(chunk(start, start + self.num_layers), h, *args)
            return h
        for i, layer in enumerate(layers):
            h = checkpoint(chunk(i, i + 1), h, *args) if i < self.num_layers else layer(h, *args)
        return h


class Checkpointed(nn.Module):
    """``module`` (without parameters) recomputed in the backward pass: selective recomputation."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if any(True for _ in module.parameters()):
            raise ValueError(
                f"selective recomputation wraps parameter-free modules, not {type(module).__name__}"
            )
        self.module = module

    def forward(self, *args):
        return checkpoint(self.module, *args) if self.training else self.module(*args)
