"""GLM for transformers: the model megatron-glm pretrains, under the same parameter names.

An input follows GLM's blank-infilling layout. Part A is the text with its blanks
(``[MASK]``, ``[sMASK]``, ``[gMASK]``); from the first ``[sop]`` on, Part B is a span being
generated. Unless the caller passes them, positions and mask come from that layout:

- Part A: positions 0, 1, ... with block position 0, attending bidirectionally within Part A;
- Part B: each ``[sop]`` starts a span; the k-th span takes the position of the k-th blank in
  Part A (the end of Part A if there are fewer blanks) and block positions 1, 2, ...; Part B
  is causal and sees all of Part A. With ``rotary_1d`` (GLM-130B) a ``[gMASK]`` span's positions
  go on from its blank's: blank + 1, blank + 2, ... Spans in another order (GLM's training shuffles them)
  need their ``position_ids`` passed; the mask is the same.

Without ``[sop]`` the whole input is Part A (a bidirectional encoder, as for classification).
``attention_mask`` (1 = token, 0 = padding) removes padding on either side. So a prompt
``"... [MASK] ...[sop]"`` given to ``generate`` fills its first blank; ``[eop]`` ends the span
(append ``[sop]`` after it to generate the next blank's).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megatron_glm import MegatronGLMConfig

# the key-value cache's name: `cache` in transformers 5.x (`past_key_values` is deprecated there), and
# `past_key_values` before it
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def glm_layout(input_ids, config, attention_mask=None):
    """``(position_ids [B, 2, S], mask [B, 1, S, S] bool)`` of whole sequences in GLM's layout."""
    b, s = input_ids.shape
    device = input_ids.device
    valid = (
        torch.ones(b, s, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.bool()
    )
    sop = (input_ids == config.sop_token_id) & valid
    index = torch.arange(s, device=device)
    sep = torch.where(sop.any(1), sop.int().argmax(1), s)  # the first [sop] opens Part B
    part_b = index[None] >= sep[:, None]
    part_a = valid & ~part_b
    position_a = (part_a.cumsum(1) - 1).clamp(min=0)
    # the k-th span of Part B fills the k-th blank of Part A (the end of Part A when there are fewer blanks)
    blank_ids = [
        i
        for i in (config.mask_token_id, config.smask_token_id, config.gmask_token_id)
        if i is not None
    ]
    blanks = torch.isin(input_ids, torch.tensor(blank_ids, device=device)) & part_a
    span = (sop & part_b).cumsum(1) - 1
    match = blanks[:, None, :] & ((blanks.cumsum(1) - 1)[:, None, :] == span[:, :, None])
    span_position = torch.where(
        match.any(-1), (match * position_a[:, None, :]).sum(-1), part_a.sum(1, keepdim=True)
    )
    last_sop = torch.where(sop, index, -1).cummax(1).values
    block_position = torch.where(part_b, index - last_sop + 1, 0)
    if config.position_embedding_type == "rotary_1d" and config.gmask_token_id is not None:
        # GLM-130B's 1D positions: a [gMASK] span goes on from its blank's position
        gmask_span = (match & (input_ids == config.gmask_token_id)[:, None, :]).any(-1)
        span_position = span_position + torch.where(gmask_span, block_position, 0)
    position_ids = torch.stack(
        [torch.where(part_b, span_position, position_a), block_position], dim=1
    )
    # query i sees key j: j is a token, and j is in Part A, or i is in Part B and j <= i (itself always:
    # a padding row with nothing to see would make the softmax NaN)
    causal = index[None, :, None] >= index[None, None, :]
    mask = valid[:, None] & (~part_b[:, None] | (part_b[:, :, None] & causal))
    return position_ids, (mask | torch.eye(s, dtype=torch.bool, device=device))[:, None]


def _rotate(x, positions, base):
    """``x [B, H, S, d]`` rotated by ``positions [B, S]`` (rotate-half RoPE)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.float()[..., None] * inv_freq
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)[:, None]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def rotary_2d(x, position_ids, base):
    """ChatGLM's 2D rotary: the first half of each head by the position, the second by the block position."""
    half = x.shape[-1] // 2
    return torch.cat(
        [
            _rotate(x[..., :half], position_ids[:, 0], base),
            _rotate(x[..., half:], position_ids[:, 1], base),
        ],
        dim=-1,
    )


class MegatronGLMAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, position_ids, mask, cache=None):
        b, s, _ = x.shape
        heads = self.config.num_attention_heads
        q, k, v = self.query_key_value(x).view(b, s, 3, heads, -1).permute(2, 0, 3, 1, 4)
        if self.config.position_embedding_type == "rotary_2d":
            q, k = (
                rotary_2d(q, position_ids, self.config.rotary_base),
                rotary_2d(k, position_ids, self.config.rotary_base),
            )
        elif (
            self.config.position_embedding_type == "rotary_1d"
        ):  # GLM-130B: the whole head, by row 0
            q, k = (
                _rotate(q, position_ids[:, 0], self.config.rotary_base),
                _rotate(k, position_ids[:, 0], self.config.rotary_base),
            )
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        p = self.config.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class MegatronGLMMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.geglu = config.geglu
        width = 2 * config.ffn_hidden_size if config.geglu else config.ffn_hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, width)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size)

    def forward(self, x):
        h = self.dense_h_to_4h(x)
        if self.geglu:  # GLM-130B: value half times GeLU of the gate half
            h, gate = h.chunk(2, dim=-1)
            return self.dense_4h_to_h(h * F.gelu(gate, approximate="tanh"))
        return self.dense_4h_to_h(F.gelu(h, approximate="tanh"))


class MegatronGLMLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.deepnorm = config.deepnorm
        self.alpha = (2.0 * config.num_layers) ** 0.5 if config.deepnorm else 1.0
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = MegatronGLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(
            config.hidden_size, eps=config.layernorm_epsilon
        )
        self.mlp = MegatronGLMMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x, position_ids, mask, cache=None):
        if self.deepnorm:  # GLM-130B's post-LN: LN(alpha * x + f(x))
            x = self.input_layernorm(
                self.alpha * x + self.dropout(self.attention(x, position_ids, mask, cache))
            )
            return self.post_attention_layernorm(self.alpha * x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.attention(self.input_layernorm(x), position_ids, mask, cache))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class MegatronGLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.position_embedding_type == "learned_2d":
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings + 1, config.hidden_size
            )
            self.block_position_embeddings = nn.Embedding(
                config.max_position_embeddings + 1, config.hidden_size
            )
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(MegatronGLMLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class MegatronGLMPreTrainedModel(PreTrainedModel):
    config_class = MegatronGLMConfig
    base_model_prefix = "glm"
    _no_split_modules = ["MegatronGLMLayer"]
    _supports_sdpa = True


class MegatronGLMForCausalLM(MegatronGLMPreTrainedModel, GenerationMixin):
    """Word and 2D position embeddings, the layers, the final LayerNorm; logits from the word embeddings."""

    def __init__(self, config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = MegatronGLMTransformer(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache=None,
        labels=None,
        use_cache=None,
        past_key_values=None,
        **kwargs,
    ):
        """``attention_mask``: ``[B, S]`` padding (the GLM mask follows from the layout) or ``[B, 1, S, S_all]`` bool.

        With a filled cache and neither a 4D mask nor ``position_ids``, the call cannot know the
        layout of what came before: pass both, or use ``generate``.
        """
        kv = (
            cache if cache is not None else past_key_values
        )  # either name, as the caller's transformers says
        past = kv.get_seq_length() if kv is not None else 0
        if attention_mask is None or attention_mask.dim() == 2:
            if past:
                raise ValueError(
                    "a call after the cache needs position_ids [B, 2, S] and a [B, 1, S, S_all] boolean "
                    "attention_mask (generate builds both)"
                )
            layout_positions, attention_mask = glm_layout(input_ids, self.config, attention_mask)
            position_ids = layout_positions if position_ids is None else position_ids
        elif position_ids is None:
            raise ValueError("a 4D attention_mask needs position_ids [B, 2, S] beside it")
        if use_cache and kv is None:
            kv = DynamicCache(config=self.config)
        h = self.word_embeddings(input_ids)
        if self.config.position_embedding_type == "learned_2d":
            h = h + self.transformer.position_embeddings(position_ids[:, 0])
            h = h + self.transformer.block_position_embeddings(position_ids[:, 1])
        h = self.transformer.embedding_dropout(h)
        kv = kv if use_cache or past else None
        for layer in self.transformer.layers:
            h = layer(h, position_ids, attention_mask.bool(), kv)
        logits = F.linear(self.transformer.final_layernorm(h), self.word_embeddings.weight)
        loss = None
        if labels is not None:  # predict token i + 1 at position i; -100 ignored (Part A, padding)
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: kv})

    def prepare_inputs_for_generation(
        self, input_ids, cache=None, attention_mask=None, past_key_values=None, **kwargs
    ):
        """The layout of the whole sequence so far, cut to the tokens the cache has not seen."""
        kv = cache if cache is not None else past_key_values
        past = kv.get_seq_length() if kv is not None else 0
        position_ids, mask = glm_layout(input_ids, self.config, attention_mask)
        return {
            "input_ids": input_ids[:, past:],
            "position_ids": position_ids[..., past:],
            "attention_mask": mask[:, :, past:],
            CACHE: kv,
            "use_cache": kwargs.get("use_cache", True),
        }


__all__ = ["MegatronGLMForCausalLM", "MegatronGLMPreTrainedModel", "glm_layout"]
