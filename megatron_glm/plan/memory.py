"""Per-GPU memory of one layout, term by term: what ``glm-plan`` ranks layouts by.

Everything is counted for *this* implementation (tests compare it with measured peaks):

- **parameters**: exact, from the model built on the meta device, split by the same rules as
  ``apply_tp`` (``partition_of``) and ``partition_layers``; the last pipeline stage also holds
  the tied output matrix as a copy in the training dtype (``pipeline_stage.TiedEmbedding``);
- **model states** per ZeRO stage (Rajbhandari et al. 2020, with DeepSpeed's buffers, see
  ``model_states``);
- **activations** saved per layer and micro-batch (Korthikanti et al. 2022, "Reducing
  Activation Recomputation", counted for our layers: see ``layer_activations``), times the
  micro-batches in flight under the pipeline schedule, or only layer inputs with full
  recomputation;
- **set-up host memory**: while a rank builds its weights on the CPU, its fp32 shard and one
  full tensor (``setup_host_bytes``); nothing else of the model exists on any rank. With ZeRO-3
  each parameter becomes the rank's partition as soon as it exists: one full tensor at a time,
  and on a CPU run the partitions;
- **transients**: the logits and the fp32 cross entropy of one micro-batch on the last stage
  (about ``12 b s V / t`` bytes), and the optimizer step's temporaries.

Bytes everywhere; ``GiB = 2**30``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from megatron_glm.config import ModelConfig
from megatron_glm.model.parallelize import partition_of
from megatron_glm.parallel.pipeline import partition_layers, stage_layer_counts
from megatron_glm.training.zero_states import BYTES, model_states, setup_host_bytes

ATTENTION = ("flash", "sdpa", "eager")


@dataclass(frozen=True)
class Workload:
    """What is trained, independent of the layout."""

    cfg: ModelConfig  # vocab_size: the padded vocabulary
    seq_length: int
    global_batch: int
    precision: str = "bf16"  # fp32 | bf16 | fp16
    # flash (ours on GPU) | sdpa (CPU default) | eager (the reference path)
    attention: str = "flash"
    device: str = "cuda"  # CUDA: Triton kernels, one-byte dropout masks; CPU: torch references, element-size masks

    def __post_init__(self):
        problems = [
            f"{flag} {value} must be positive"
            for flag, value in (
                ("--seq-length", self.seq_length),
                ("--global-batch-size", self.global_batch),
            )
            if value < 1
        ]
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1  # model chunks per pipeline rank (interleaved 1F1B)
    micro_batch: int = 1
    zero: int = 1
    sequence_parallel: bool = False
    recompute: str | None = None  # None | selective | full (uniform, one layer per chunk)
    cpu_offload: bool = False
    # Megatron's uneven split (--decoder-first/last-pipeline-num-layers), None: the uniform one
    ends: tuple[int, int] | None = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def stage_layers(self, num_layers: int) -> list[int]:
        """Transformer layers of each pipeline rank (all its chunks)."""
        counts = self.layer_counts(num_layers)
        if counts is None:
            return [num_layers // self.pp] * self.pp
        return [sum(counts[c * self.pp + r] for c in range(self.vpp)) for r in range(self.pp)]

    def layer_counts(self, num_layers: int) -> list[int] | None:
        """Layers of each virtual stage for an uneven split (``partition_layers``' order), else None."""
        if self.ends is None:
            return None
        return stage_layer_counts(num_layers, self.pp, self.vpp, *self.ends)

    def micro_batches(self, global_batch: int) -> int:
        return global_batch // (self.micro_batch * self.dp)

    @property
    def label(self) -> str:
        """``TP4 PP8[8|..|8] DP24 mb1 Z1 rc-full``: ``[first|..|last]``, an uneven split's end stages' layers."""
        ends = f"[{self.ends[0]}|..|{self.ends[1]}]" if self.ends else ""
        vpp = f"x{self.vpp}" if self.vpp > 1 else ""
        return (
            f"TP{self.tp} PP{self.pp}{ends}{vpp} DP{self.dp} mb{self.micro_batch} Z{self.zero}"
            f"{' SP' if self.sequence_parallel else ''}{' rc-' + self.recompute if self.recompute else ''}"
        )


@dataclass
class StageMemory:
    """One pipeline rank's bytes, by term."""

    stage: int
    parameters: int  # elements this rank holds (its TP share)
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    transient: int = 0  # live only around the output layer's backward or the optimizer step
    in_flight: int = 0  # micro-batches (model-chunk forwards) whose activations are held at once
    # host (CPU) bytes while the rank builds its weights, before they move to the GPU
    setup_host: int = 0
    terms: dict = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def peak(self) -> int:
        return self.model_states + self.activations + self.transient


@functools.lru_cache(maxsize=64)
def _parameter_shapes(cfg_items: tuple) -> tuple:
    """``(name, elements)`` of every parameter, from the model built on the meta device (no memory)."""
    import torch

    from megatron_glm.model.glm import GLMModel

    with torch.device("meta"):
        model = GLMModel(ModelConfig(**dict(cfg_items)))
    return tuple((name, p.numel()) for name, p in model.named_parameters())


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, vpp: int = 1, counts=None) -> list[dict]:
    """Per pipeline rank: elements of this TP rank's parameters, split into ``embedding`` and ``other``
    (``counts``: the layers of each virtual stage of an uneven split)."""
    ranges = partition_layers(cfg.num_layers, pp, vpp, counts)
    owner = {i: r for r, chunks in enumerate(ranges) for chunk in chunks for i in chunk}
    stages = [{"embedding": 0, "other": 0, "largest_full": 0} for _ in range(pp)]
    for name, numel in _parameter_shapes(tuple(sorted(cfg.to_dict().items()))):
        n = numel // tp if partition_of(name, cfg.geglu) else numel
        if name.startswith("transformer.layers."):
            stage, key = owner[int(name.split(".")[2])], "other"
        elif name == "word_embeddings.weight":
            stage, key = 0, "embedding"
        elif "final_layernorm" in name:
            stage, key = pp - 1, "other"
        else:  # 2D position tables
            stage, key = 0, "other"
        stages[stage][key] += n
        stages[stage]["largest_full"] = max(stages[stage]["largest_full"], numel)
    return stages


def layer_activations(w: Workload, lay: Layout) -> dict:
    """Bytes one transformer layer saves for backward, per micro-batch, by term (see module doc)."""
    cfg, e, t = w.cfg, BYTES[w.precision], lay.tp
    b, s, h = lay.micro_batch, w.seq_length, cfg.hidden_size
    a, f = cfg.num_attention_heads, cfg.ffn_hidden_size
    n = b * s * h
    mask = (1 if w.device == "cuda" else e) if cfg.hidden_dropout > 0 else 0
    sp = t if lay.sequence_parallel else 1
    terms = {
        # the layer input and the residual after attention (the two LayerNorm inputs), the two
        # hidden-dropout masks and the LayerNorm statistics: split along the sequence with SP
        "layernorm_inputs": (2 * e * n + 2 * mask * n + 16 * b * s) // sp,
        # the LayerNorm outputs saved by the column-parallel linears (gathered in full with SP)
        "linear_inputs": 2 * e * n,
        "qkv": 3 * e * n // t,
        "mlp": e * b * s * (2 * f if cfg.geglu else f) // t
        + e * b * s * f // t * (2 if cfg.geglu else 1),
    }
    if cfg.position_embedding_type == "rotary_2d":
        # the Triton kernel: rotated q and k (SDPA keeps one more copy), int64 positions
        if w.device == "cuda":
            terms["rotary"] = (2 if w.attention == "flash" else 3) * e * n // t + 16 * b * s
        else:  # the torch reference: rotated halves and their concatenations
            terms["rotary"] = 4 * e * n // t
    elif cfg.position_embedding_type == "rotary_1d":  # the torch reference on every device
        terms["rotary"] = 4 * e * n // t
    heads = a // t
    if w.attention == "flash":
        # O and its [b, s, h] copy for the dense layer; fp32 log-sum-exp; int32 bounds
        terms["attention"] = 2 * e * n // t + 4 * b * heads * s + 8 * b * s
    elif w.attention == "sdpa":
        # O (the dense input is a view of it), log-sum-exp, and the dense additive mask built per layer
        terms["attention"] = e * n // t + 4 * b * heads * s + e * b * s * s
        # PyTorch's math path (in fp32 on CPU): scores, probabilities, dropout mask
        if cfg.attention_dropout > 0:
            terms["attention"] += 3 * 4 * b * heads * s * s
    else:  # the reference: fp32 probabilities, a boolean mask, the context
        terms["attention"] = 4 * b * heads * s * s + b * s * s + e * n // t
        if cfg.attention_dropout > 0:  # the dropout mask and the dropped probabilities
            terms["attention"] += 2 * 4 * b * heads * s * s
    return terms


def padded_for(cfg: ModelConfig, tp: int, multiple: int = 128) -> ModelConfig:
    """The vocabulary padded as the tokenizer pads it for ``tp`` ranks (``padded_vocab_size``)."""
    from megatron_glm.data.tokenizer import pad_vocab

    return dataclasses.replace(cfg, vocab_size=pad_vocab(cfg.vocab_size, tp, multiple))


def in_flight(lay: Layout, micro_batches: int, stage: int) -> int:
    """Model-chunk forwards whose activations one pipeline rank holds at once (our schedules)."""
    p, v = lay.pp, lay.vpp
    if p == 1:
        return 1
    if v == 1:
        return min(p - stage, micro_batches)
    total = micro_batches * v
    if micro_batches == p:
        return total
    return min((p - stage - 1) * 2 + (v - 1) * p + 1, total)


def estimate(w: Workload, lay: Layout) -> list[StageMemory]:
    """Every pipeline rank's memory (data- and tensor-parallel ranks are alike)."""
    cfg, e = padded_for(w.cfg, lay.tp), BYTES[w.precision]
    w = dataclasses.replace(w, cfg=cfg)
    m = lay.micro_batches(w.global_batch)
    rank_layers = lay.stage_layers(cfg.num_layers)
    per_layer = layer_activations(w, lay)
    layer_bytes = sum(per_layer.values())
    b, s, h, t = lay.micro_batch, w.seq_length, cfg.hidden_size, lay.tp
    vocab_share = cfg.vocab_size // t
    out = []
    split = lay.layer_counts(cfg.num_layers)
    for r, counts in enumerate(stage_parameters(cfg, t, lay.pp, lay.vpp, split)):
        layers_per_chunk = (
            rank_layers[r] / lay.vpp
        )  # a chunk's layers (on average, for an uneven split)
        params = counts["embedding"] + counts["other"]
        st = StageMemory(
            stage=r,
            parameters=params,
            in_flight=in_flight(lay, m, r),
            setup_host=setup_host_bytes(counts, lay.dp if lay.zero == 3 else 0, w.device),
        )
        st.terms.update(model_states(params, w.precision, lay.zero, lay.dp, lay.cpu_offload))
        if lay.pp > 1 and r == lay.pp - 1:  # the tied output matrix's copy and its gradient
            st.terms["tied_copy"] = e * vocab_share * h
        kept = e * b * s * h // (t if lay.sequence_parallel else 1)  # a layer's input
        if lay.recompute == "full":  # every layer's input stays; one layer at a time is rebuilt
            st.terms["activations"] = int(st.in_flight * kept * layers_per_chunk)
            st.terms["recompute"] = layer_bytes
        elif lay.recompute == "selective":  # the core attention is rebuilt, one layer at a time
            st.terms["activations"] = int(
                st.in_flight * layers_per_chunk * (layer_bytes - per_layer["attention"])
            )
            st.terms["recompute"] = per_layer["attention"]
        else:
            st.terms["activations"] = int(st.in_flight * layers_per_chunk * layer_bytes)
        # one micro-batch's logits in fp32: log-softmax, its gradient, the logits' gradient;
        if r == lay.pp - 1:
            # the vocab-parallel cross entropy also holds the shifted logits and their exponentials at once
            st.terms["output_layer"] = (12 if t == 1 else 16) * b * s * vocab_share
        # the optimizer step: torch's Adam makes a temporary the size of the largest tensor it updates
        # (the whole flat partition under ZeRO)
        biggest = -(-params // lay.dp) if lay.zero else max(counts["embedding"], 1)
        # + fp32 gradients
        step = 4 * biggest + (4 * params if lay.zero == 0 and w.precision != "fp32" else 0)
        st.terms["optimizer_step"] = 0 if lay.cpu_offload else step
        st.weights = st.terms["weights"] + st.terms.get("tied_copy", 0)
        st.gradients = st.terms["gradients"] + st.terms.get("tied_copy", 0)
        st.optimizer = st.terms["optimizer"] + st.terms["buffers"]
        st.activations = st.terms["activations"]
        # the peak is at the output layer's backward, while a layer is recomputed, or in the step
        st.transient = max(
            st.terms.get("output_layer", 0),
            st.terms.get("recompute", 0),
            st.terms["optimizer_step"] - st.activations,
        )
        out.append(st)
    return out
