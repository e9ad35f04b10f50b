"""Model configuration, the GLM presets, and the checks that catch impossible shapes early.

Presets follow the GLM paper's table; ``glm-tiny`` is ours, sized
to train on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None  # 4h by default
    max_position_embeddings: int = 256
    vocab_size: int = 0  # padded vocabulary (tokenizer.padded_vocab_size); set from the tokenizer
    position_embedding_type: str = "learned_2d"  # the paper; "rotary_2d" as in ChatGLM
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    geglu: bool = False  # GLM-130B's gated MLP
    deepnorm: bool = False  # GLM-130B's post-LN with residual scaling alpha = (2N)^0.5
    rotary_base: float = 10000.0
    # GLM-130B's embedding gradient shrink: the word embedding's gradient times alpha (1.0: off)
    embedding_gradient_shrink_alpha: float = 1.0

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, seq_length: int | None = None) -> None:
        """Raise ``ValueError`` naming the flag to change for a shape the model cannot take."""
        problems = []
        if not 0.0 <= self.embedding_gradient_shrink_alpha <= 1.0:
            problems.append(f"--embedding-gradient-shrink-alpha must be in [0, 1] (GLM-130B: 0.1), "
                            f"got {self.embedding_gradient_shrink_alpha}")
        if self.num_layers < 1 or self.hidden_size < 1 or self.num_attention_heads < 1:
            problems.append("--num-layers, --hidden-size and --num-attention-heads must be positive")
        elif self.hidden_size % self.num_attention_heads:
            problems.append(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                            f"{self.num_attention_heads}")
        elif self.position_embedding_type == "rotary_2d" and self.head_dim % 4:
            problems.append(f"2D rotary needs a head dim divisible by 4 (two rotated halves), got {self.head_dim}")
        if self.position_embedding_type not in ("learned_2d", "rotary_2d"):
            problems.append(f"--position-embedding-type {self.position_embedding_type!r}: use learned_2d or rotary_2d")
        if self.vocab_size < 1:
            problems.append("vocab size is not set: it comes from the tokenizer (padded_vocab_size)")
        if seq_length is not None and seq_length > self.max_position_embeddings:
            problems.append(f"--seq-length {seq_length} exceeds --max-position-embeddings "
                            f"{self.max_position_embeddings}: positions beyond the table have no embedding")
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


# layers, hidden, heads, max positions (the GLM paper)
PRESETS: dict[str, dict] = {
    "glm-tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, max_position_embeddings=512),
    "glm-base": dict(num_layers=12, hidden_size=768, num_attention_heads=12, max_position_embeddings=512),
    "glm-large": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, max_position_embeddings=512),
    "glm-410m": dict(num_layers=30, hidden_size=1024, num_attention_heads=16, max_position_embeddings=512),
    "glm-515m": dict(num_layers=30, hidden_size=1152, num_attention_heads=18, max_position_embeddings=512),
    "glm-2b": dict(num_layers=36, hidden_size=2048, num_attention_heads=32, max_position_embeddings=1024),
    "glm-10b": dict(num_layers=48, hidden_size=4096, num_attention_heads=64, max_position_embeddings=1024),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
