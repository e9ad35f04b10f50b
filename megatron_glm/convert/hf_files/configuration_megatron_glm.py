"""Configuration of a megatron-glm export (GLM: autoregressive blank infilling, Du et al. 2021)."""

from transformers import PretrainedConfig


class MegatronGLMConfig(PretrainedConfig):
    """The architecture as megatron-glm trains it; ``megatron_glm`` keeps its own record for ``import-hf``.

    ``position_embedding_type``: ``learned_2d`` (the paper: two learned tables), ``rotary_2d``
    (ChatGLM: the two halves of each head rotated by the two positions) or ``rotary_1d`` (GLM-130B:
    the whole head rotated by one position). ``geglu`` and ``deepnorm``
    are GLM-130B's gated MLP and post-LN residual scaling. The special ids are the tokenizer's.
    """

    model_type = "megatron_glm"
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "ffn_hidden_size",
        "layer_norm_eps": "layernorm_epsilon",
    }

    def __init__(
        self,
        vocab_size=50304,
        hidden_size=1024,
        num_layers=24,
        num_attention_heads=16,
        ffn_hidden_size=None,
        max_position_embeddings=512,
        position_embedding_type="learned_2d",
        layernorm_epsilon=1e-5,
        geglu=False,
        deepnorm=False,
        rotary_base=10000.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        mask_token_id=None,
        smask_token_id=None,
        gmask_token_id=None,
        sop_token_id=None,
        eop_token_id=None,
        pad_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        self.layernorm_epsilon = layernorm_epsilon
        self.geglu = geglu
        self.deepnorm = deepnorm
        self.rotary_base = rotary_base
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.smask_token_id = smask_token_id
        self.gmask_token_id = gmask_token_id
        self.sop_token_id = sop_token_id
        self.eop_token_id = eop_token_id
        # the logits are the word embeddings' transpose by construction: there is no separate head to tie
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
