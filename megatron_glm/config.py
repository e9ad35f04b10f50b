"""Model configuration, the GLM presets, and the checks that catch impossible shapes early.

Presets follow the GLM paper's table; ``glm-tiny`` is ours, sized
to train on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_glm.flags import add_flags, flag_values, flagged_fields, internal, setting, value_of

POSITION_TYPES = ("learned_2d", "rotary_2d", "rotary_1d")


@dataclass(kw_only=True)
class ModelConfig:
    """The architecture: what a checkpoint's weights mean (glm-pretrain's model flags)."""

    # the sizes default to --preset's when one is given (the parser leaves them None until then)
    num_layers: int = setting(
        2, "transformer layers (default: the preset's, else 2)", parser_default=None
    )
    hidden_size: int = setting(128, "default: the preset's, else 128", parser_default=None)
    num_attention_heads: int = setting(4, "default: the preset's, else 4", parser_default=None)
    ffn_hidden_size: int | None = setting(None, "default: 4 x --hidden-size")
    max_position_embeddings: int = setting(
        256, "position table rows (default: the preset's, else --seq-length)", parser_default=None
    )
    # padded vocabulary (tokenizer.padded_vocab_size); set from the tokenizer
    vocab_size: int = internal(0)
    position_embedding_type: str = setting(
        "learned_2d",
        "learned_2d: the paper's (the default); rotary_2d: as in ChatGLM; rotary_1d: GLM-130B's (Part A "
        "0..n-1, a [MASK] span at its blank's position, a [gMASK] span continuing from its blank)",
        choices=POSITION_TYPES,
        parser_default=None,
    )
    hidden_dropout: float = setting(0.1)
    attention_dropout: float = setting(0.1)
    layernorm_epsilon: float = setting(
        1e-5, "LayerNorm epsilon", name="--norm-epsilon", aliases=("--layernorm-epsilon",)
    )
    init_method_std: float = setting(0.02)
    geglu: bool = setting(False, "GLM-130B's gated MLP")
    deepnorm: bool = setting(False, "GLM-130B's DeepNorm (post-LN, scaled residual)")
    rotary_base: float = internal(10000.0)
    embedding_gradient_shrink_alpha: float = setting(
        1.0,
        "GLM-130B's stability trick: the word embedding's gradient times alpha (GLM-130B: 0.1), the forward "
        "unchanged; 1.0 is off",
    )

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    @property
    def positions_1d(self) -> bool:
        """Row 0 of the batch's positions is GLM-130B's 1D position (row 1 still counts within a span)."""
        return self.position_embedding_type == "rotary_1d"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, seq_length: int | None = None) -> None:
        """Raise ``ValueError`` naming the flag to change for a shape the model cannot take."""
        problems = []
        if not 0.0 <= self.embedding_gradient_shrink_alpha <= 1.0:
            problems.append(
                f"--embedding-gradient-shrink-alpha must be in [0, 1] (GLM-130B: 0.1), "
                f"got {self.embedding_gradient_shrink_alpha}"
            )
        if self.num_layers < 1 or self.hidden_size < 1 or self.num_attention_heads < 1:
            problems.append(
                "--num-layers, --hidden-size and --num-attention-heads must be positive"
            )
        elif self.hidden_size % self.num_attention_heads:
            problems.append(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}"
            )
        elif self.position_embedding_type == "rotary_2d" and self.head_dim % 4:
            problems.append(
                f"2D rotary needs a head dim divisible by 4 (two rotated halves), got {self.head_dim}"
            )
        elif self.position_embedding_type == "rotary_1d" and self.head_dim % 2:
            problems.append(f"1D rotary needs an even head dim, got {self.head_dim}")
        if self.position_embedding_type not in POSITION_TYPES:
            problems.append(
                f"--position-embedding-type {self.position_embedding_type!r}: use one of "
                + ", ".join(POSITION_TYPES)
            )
        if self.vocab_size < 1:
            problems.append(
                "vocab size is not set: it comes from the tokenizer (padded_vocab_size)"
            )
        if seq_length is not None and seq_length > self.max_position_embeddings:
            problems.append(
                f"--seq-length {seq_length} exceeds --max-position-embeddings "
                f"{self.max_position_embeddings}: positions beyond the table have no embedding"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"--{name.replace('_', '-')} must be in [0, 1)")
        if problems:
            raise ValueError("invalid model configuration: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def architecture_differences(self, other: "ModelConfig") -> list[str]:
        """Fields that change parameter shapes or semantics (dropout may differ between runs)."""
        ignore = {"hidden_dropout", "attention_dropout", "init_method_std"}
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]} vs {b[k]}" for k in a if k not in ignore and a[k] != b[k]]


# layers, hidden, heads, max positions (the GLM paper); a size flag given overrides the preset's, and so
# does any other architecture flag given with a value other than its default
PRESET_SIZES = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "max_position_embeddings",
)
PRESETS: dict[str, dict] = {
    "glm-tiny": dict(
        num_layers=4, hidden_size=128, num_attention_heads=4, max_position_embeddings=512
    ),
    "glm-base": dict(
        num_layers=12, hidden_size=768, num_attention_heads=12, max_position_embeddings=512
    ),
    "glm-large": dict(
        num_layers=24, hidden_size=1024, num_attention_heads=16, max_position_embeddings=512
    ),
    "glm-410m": dict(
        num_layers=30, hidden_size=1024, num_attention_heads=16, max_position_embeddings=512
    ),
    "glm-515m": dict(
        num_layers=30, hidden_size=1152, num_attention_heads=18, max_position_embeddings=512
    ),
    "glm-2b": dict(
        num_layers=36, hidden_size=2048, num_attention_heads=32, max_position_embeddings=1024
    ),
    "glm-10b": dict(
        num_layers=48, hidden_size=4096, num_attention_heads=64, max_position_embeddings=1024
    ),
    # GLM-130B (Zeng et al. 2022, arXiv 2210.02414, Table 11; THUDM/GLM-130B configs/model_glm_130b.sh):
    # 70 layers, hidden 12,288, 96 heads, GeGLU FFN 32,768 (8h/3), sequence 2,048, post-LN DeepNorm, 1D
    # rotary (its SAT model leaves position_encoding_2d off), word-embedding gradient shrink 0.1
    "glm-130b": dict(
        num_layers=70,
        hidden_size=12288,
        num_attention_heads=96,
        ffn_hidden_size=32768,
        max_position_embeddings=2048,
        geglu=True,
        deepnorm=True,
        position_embedding_type="rotary_1d",
        embedding_gradient_shrink_alpha=0.1,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def add_model_flags(group) -> None:
    """``--preset`` and the architecture's flags (glm-pretrain's and glm-plan's model group)."""
    group.add_argument(
        "--preset", choices=sorted(PRESETS), help="sizes of a published GLM (flags below override)"
    )
    add_flags(group, ModelConfig)


def model_from_flags(values, vocab_size: int, seq_length: int) -> ModelConfig:
    """The architecture the flags describe over ``--preset``'s (or the defaults), not yet validated.

    A ``--hidden-size`` without ``--ffn-hidden-size`` means 4h, and without a preset the position
    table is ``seq_length`` rows: the defaults Megatron's users expect.
    """
    given = flag_values(ModelConfig, values)
    name = value_of(values, "preset")
    cfg = preset(name, vocab_size=vocab_size) if name else ModelConfig(vocab_size=vocab_size)
    defaults = ModelConfig()
    # flags whose parser holds None when absent: any value of theirs was given
    given_when_set = {
        f.name for f, spec, _ in flagged_fields(ModelConfig) if spec.parser_default is None
    }
    for field, value in given.items():
        if value is None:
            continue
        # a switch or number left at its default keeps the preset's (--preset glm-130b stays GeGLU)
        if (
            name
            and field in PRESETS[name]
            and field not in given_when_set
            and value == getattr(defaults, field)
        ):
            continue
        setattr(cfg, field, value)
    if given.get("hidden_size") is not None and given.get("ffn_hidden_size") is None:
        cfg.ffn_hidden_size = 4 * given["hidden_size"]
    if given.get("max_position_embeddings") is None and not name:
        cfg.max_position_embeddings = seq_length
    return cfg
