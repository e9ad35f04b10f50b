"""GLM, top to bottom: word + 2D position embeddings, pre-LN transformer layers, tied logits.

Parameter names follow the original implementation (THUDM/GLM) so its
checkpoints map one to one: ``word_embeddings``, ``transformer.position_embeddings``,
``transformer.block_position_embeddings``, ``transformer.layers.{i}.attention.query_key_value``
(``[Q; K; V]`` along the output dimension), ``...attention.dense``, ``...mlp.dense_h_to_4h``,
``...mlp.dense_4h_to_h``, ``transformer.final_layernorm``.

The model takes the batch contract: tokens ``[B, S]``, ``position_ids [B, 2, S]``
and the attention bounds ``attn_lo``/``attn_hi`` ``[B, S]``. With a ``KVCache`` it runs
incrementally: keys and values of earlier calls are kept, the bounds index the whole cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm import kernels
from megatron_glm.config import ModelConfig
from megatron_glm.model.attention import interval_attention


class KVCache:
    """Keys and values per layer, ``[B, H, S_cached, D]``, grown by each incremental call.

    A pipeline stage fills only its own layers' entries; the others stay None.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    @property
    def length(self) -> int:
        return next((k.shape[2] for k in self.keys if k is not None), 0)

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the caches of the surviving beams)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]

    def truncate(self, length: int) -> None:
        self.keys = [None if k is None else k[:, :, :length] for k in self.keys]
        self.values = [None if v is None else v[:, :, :length] for v in self.values]

    def copy(self) -> "KVCache":
        other = KVCache(len(self.keys))
        other.keys, other.values = list(self.keys), list(self.values)
        return other


class CoreAttention(nn.Module):
    """Scores, GLM mask, softmax, dropout, values: no parameters, so recomputation can wrap it alone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dropout_p = cfg.attention_dropout
        self.impl = "auto"
        # tensor parallelism: a per-rank RNG for dropout on split heads
        self.rng_fork = contextlib.nullcontext

    def forward(self, q, k, v, attn_lo, attn_hi):
        with self.rng_fork():
            return interval_attention(
                q,
                k,
                v,
                attn_lo,
                attn_hi,
                dropout_p=self.dropout_p if self.training else 0.0,
                impl=self.impl,
            )


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.core_attention = CoreAttention(cfg)

    def forward(self, x, position_ids, attn_lo, attn_hi, cache: KVCache | None = None):
        qkv = self.query_key_value(x)  # [Q; K; V] of this rank's heads (all heads without TP)
        b, s = qkv.shape[:2]
        d = self.cfg.head_dim
        heads = qkv.shape[-1] // (3 * d)
        q, k, v = qkv.view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4)
        if self.cfg.position_embedding_type == "rotary_2d":
            q, k = kernels.rotary_2d(q, k, position_ids, self.cfg.rotary_base)
        elif self.cfg.position_embedding_type == "rotary_1d":  # row 0 holds the 1D position
            q, k = kernels.rotary_1d(q, k, position_ids[:, 0], self.cfg.rotary_base)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = self.core_attention(q, k, v, attn_lo, attn_hi)
        return self.dense(out.transpose(1, 2).reshape(b, s, heads * d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.geglu = cfg.geglu
        width = 2 * cfg.ffn_hidden_size if cfg.geglu else cfg.ffn_hidden_size
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, width)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x):
        h = self.dense_h_to_4h(x)
        if self.geglu:
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate, approximate="tanh")
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dense_4h_to_h(h)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.deepnorm = cfg.deepnorm
        self.alpha = (2.0 * cfg.num_layers) ** 0.5 if cfg.deepnorm else 1.0
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = Attention(cfg, layer)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, position_ids, attn_lo, attn_hi, cache=None):
        if self.deepnorm:  # post-LN: LN(alpha * x + f(x))
            h = self.attention(x, position_ids, attn_lo, attn_hi, cache)
            x = self.input_layernorm(self.alpha * x + self.dropout(h))
            return self.post_attention_layernorm(self.alpha * x + self.dropout(self.mlp(x)))
        x = x + self.dropout(
            self.attention(self.input_layernorm(x), position_ids, attn_lo, attn_hi, cache)
        )
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """Layers ``layers`` of the stack; the 2D position tables with the first, the final LayerNorm with the last."""

    def __init__(
        self, cfg: ModelConfig, layers: range, pre_process: bool = True, post_process: bool = True
    ):
        super().__init__()
        if pre_process and cfg.position_embedding_type == "learned_2d":
            rows = cfg.max_position_embeddings + 1
            self.position_embeddings = nn.Embedding(rows, cfg.hidden_size)
            self.block_position_embeddings = nn.Embedding(rows, cfg.hidden_size)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg, i) for i in layers)
        if post_process:
            self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        # a parallel.recompute.Recompute: how the stack is recomputed in training
        self.recompute = None

    def run_layers(self, h, position_ids, attn_lo, attn_hi, cache=None):
        if self.recompute is not None and self.training and cache is None:
            return self.recompute(self.layers, h, position_ids, attn_lo, attn_hi)
        for layer in self.layers:
            h = layer(h, position_ids, attn_lo, attn_hi, cache)
        return h


class TiedOutput(nn.Module):
    """Logits from the word-embedding matrix, and the matching per-token cross entropy."""

    def forward(self, h, weight):
        return F.linear(h, weight)

    @staticmethod
    def cross_entropy(logits, labels):
        return F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), reduction="none"
        ).view_as(labels)

    @staticmethod
    def is_argmax(logits, labels):
        """Whether each label's logit is the largest (a tie counts): what greedy decoding would pick."""
        logits = logits.detach().float()
        return logits.gather(-1, labels[..., None]).squeeze(-1) >= logits.max(dim=-1).values


def init_parameter(
    cfg: ModelConfig, name: str, shape, seed: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The initial value of the full (unsharded) parameter ``name``: the same on every rank and layout.

    N(0, std) everywhere, output projections scaled by 1/sqrt(2L), DeepNorm's beta when on; zero
    biases, unit LayerNorms. Each parameter draws from its own generator, seeded from ``seed`` and
    its single-model name, so a rank that builds only some layers, or only its tensor-parallel
    slice of them (``model/parallelize.py``), gets bitwise the values a one-process run starts from.
    ``out``, when given, is filled instead of a new tensor.
    """
    out = torch.empty(shape) if out is None else out
    if name.endswith("bias"):
        return out.zero_()
    if "layernorm" in name:
        return out.fill_(1.0)
    std = cfg.init_method_std
    if cfg.deepnorm and ("dense" in name or "query_key_value" in name):
        std *= (8.0 * cfg.num_layers) ** -0.25
    elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        std /= math.sqrt(2.0 * cfg.num_layers)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return out.normal_(0.0, std, generator=generator)


class GLMModel(nn.Module):
    """The whole model, or one pipeline chunk of it: ``layers`` (global indices), embeddings if
    ``pre_process``, final LayerNorm and logits if ``post_process``.

    ``seed`` fixes the initial weights (``init_parameter``); None draws it from torch's default
    generator. Built under ``torch.device("meta")`` it holds shapes only (``model/parallelize.py``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layers: range | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        seed: int | None = None,
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        layers = range(cfg.num_layers) if layers is None else layers
        self.layer_offset = layers.start
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.transformer = Transformer(cfg, layers, pre_process, post_process)
        if post_process:
            self.output_layer = TiedOutput()
        # a last pipeline stage without the embeddings keeps a copy of the tied matrix (parallel/pipeline_stage.py)
        self.tied_weight_copy = None
        self.tensor_parallel = 1  # model/parallelize.py's apply_tp records its TP size
        if not next(self.parameters()).is_meta:
            self.reset_parameters(seed)

    def full_name(self, name: str) -> str:
        """A parameter's name in the single model (``transformer.layers.{global index}...``)."""
        parts = name.split(".")
        if self.layer_offset and parts[:2] == ["transformer", "layers"]:
            parts[2] = str(self.layer_offset + int(parts[2]))
        return ".".join(parts)

    def reset_parameters(self, seed: int | None = None) -> None:
        seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        with torch.no_grad():
            for name, p in self.named_parameters():
                init_parameter(self.cfg, self.full_name(name), p.shape, seed, out=p)

    def embed(self, tokens, position_ids):
        learned = self.cfg.position_embedding_type == "learned_2d"
        alpha = self.cfg.embedding_gradient_shrink_alpha
        # one fused pass (the vocab-parallel one reduces)
        if learned and type(self.word_embeddings) is nn.Embedding:
            # the lookup is linear in the table, so shrinking the gradient the lookup gives the table is
            # shrinking the word embedding output's; the tied output layer's share is untouched
            h = kernels.embedding_2d(
                tokens,
                position_ids,
                scale_gradient(self.word_embeddings.weight, alpha),
                self.transformer.position_embeddings.weight,
                self.transformer.block_position_embeddings.weight,
            )
        else:
            h = scale_gradient(self.word_embeddings(tokens), alpha)
            if learned:
                h = h + self.transformer.position_embeddings(position_ids[:, 0])
                h = h + self.transformer.block_position_embeddings(position_ids[:, 1])
        return self.transformer.embedding_dropout(h)

    def tied_weight_shape(self) -> tuple[int, int]:
        """This TP rank's rows of the tied output matrix (a last pipeline stage keeps a copy)."""
        return self.cfg.vocab_size // self.tensor_parallel, self.cfg.hidden_size

    def output_weight(self):
        """The tied output matrix: the word embeddings, or their copy on a last pipeline stage."""
        return self.word_embeddings.weight if self.pre_process else self.tied_weight_copy

    def forward(
        self,
        tokens,
        position_ids,
        attn_lo,
        attn_hi,
        cache: KVCache | None = None,
        hidden_states=None,
    ):
        """Logits ``[B, S, V]`` over the padded vocabulary (tied to the word embeddings).

        A pipeline stage without ``pre_process`` starts from ``hidden_states``; one without
        ``post_process`` returns its hidden states.
        """
        h = self.embed(tokens, position_ids) if self.pre_process else hidden_states
        h = self.transformer.run_layers(h, position_ids, attn_lo, attn_hi, cache)
        if not self.post_process:
            return h
        h = self.transformer.final_layernorm(h)
        return self.output_layer(h, self.output_weight())

    def score(self, logits, labels, loss_mask):
        """Per row: the summed negative log-likelihood of the targets in ``loss_mask``, their count, and how many
        of them are the argmax (evaluation, ``data/eval_tasks.py``)."""
        nll = self.output_layer.cross_entropy(logits, labels).detach()
        correct = self.output_layer.is_argmax(logits, labels).float()
        return (nll * loss_mask).sum(dim=1), loss_mask.sum(dim=1), (correct * loss_mask).sum(dim=1)

    def loss(self, logits, labels, loss_mask):
        """``glm_loss`` with the cross entropy that matches the output layer (vocab-parallel or not)."""
        return glm_loss(logits, labels, loss_mask, self.output_layer.cross_entropy)

    def set_attention_impl(self, impl: str) -> None:
        # wrapped by recomputation or not
        for core in (m for m in self.modules() if isinstance(m, CoreAttention)):
            core.impl = impl


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.alpha, None


def scale_gradient(x, alpha: float):
    """``x`` itself forward (bitwise), its gradient times ``alpha`` backward: GLM-130B's embedding gradient shrink.

    GLM-130B writes it ``alpha * x + (1 - alpha) * x.detach()``, which has the same gradient but rounds the
    forward; an identity with a scaled backward does not.
    """
    return x if alpha == 1.0 else _ScaleGradient.apply(x, alpha)


def glm_loss(logits, labels, loss_mask, cross_entropy=TiedOutput.cross_entropy):
    """Mean cross entropy over the tokens with ``loss_mask`` (Part B), in fp32; and per-sample sums."""
    losses = cross_entropy(logits, labels)
    masked = losses * loss_mask
    return masked.sum() / loss_mask.sum().clamp(min=1.0), masked.sum(dim=1), loss_mask.sum(dim=1)
