"""``apply_ac``: activation recomputation, Megatron's flags.

- ``full`` + ``uniform``: the layer stack in chunks of ``num_layers``; only each chunk's input
  is kept, the chunk is recomputed in the backward pass;
- ``full`` + ``block``: the first ``num_layers`` layers recomputed one by one, the rest stored;
- ``selective``: only the core attention (scores, softmax, dropout) is recomputed.

Recomputation restores the default and the tensor-parallel RNG states, so dropout masks in
the replay equal the first pass (``parallel/random.py``).
"""

from __future__ import annotations

import types

from megatron_glm.parallel.random import checkpoint

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")


def _run_layers(transformer, method, num_layers, h, position_ids, attn_lo, attn_hi, cache=None):
    layers = list(transformer.layers)
    if cache is not None or not transformer.training:  # generation and evaluation keep nothing anyway
        for layer in layers:
            h = layer(h, position_ids, attn_lo, attn_hi, cache)
        return h

    def chunk(start, end):
        def run(x, pos, lo, hi):
            for layer in layers[start:end]:
                x = layer(x, pos, lo, hi)
            return x
        return run

    if method == "uniform":
        for start in range(0, len(layers), num_layers):
            h = checkpoint(chunk(start, start + num_layers), h, position_ids, attn_lo, attn_hi)
    else:
        for i, layer in enumerate(layers):
            h = checkpoint(chunk(i, i + 1), h, position_ids, attn_lo, attn_hi) if i < num_layers else \
                layer(h, position_ids, attn_lo, attn_hi)
    return h


def apply_ac(model, granularity: str | None, method: str = "uniform", num_layers: int = 1):
    """Enable recomputation on ``model`` in place; ``granularity=None`` leaves it unchanged."""
    if granularity is None:
        return model
    if granularity not in GRANULARITIES or method not in METHODS:
        raise ValueError(f"--recompute-granularity {granularity!r} / --recompute-method {method!r}: "
                         f"choose from {GRANULARITIES} and {METHODS}")
    if num_layers < 1:
        raise ValueError("--recompute-num-layers must be at least 1")
    if granularity == "selective":
        for layer in model.transformer.layers:
            core = layer.attention.core_attention
            layer.attention.core_attention = lambda q, k, v, lo, hi, core=core: checkpoint(core, q, k, v, lo, hi)
        return model
    transformer = model.transformer
    transformer.run_layers = types.MethodType(
        lambda self, *args, **kw: _run_layers(self, method, num_layers, *args, **kw), transformer)
    return model
