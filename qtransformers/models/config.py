"""ModelConfig: one frozen, validated description of a BERT / OPT / ViT model and its attention."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from qtransformers.nn.attention import validate_attention_fields
from qtransformers.nn.layers import ACTIVATIONS

MODEL_FAMILIES = ("bert", "opt", "vit")
POOLINGS = ("mean", "cls", "max")  # sentence-encoder pooling of the last hidden state
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and attention method. Defaults are BERT-base (paper.md §6).

    Attention method fields (paper.md §2-3): softmax ("vanilla" | "clipped" | "softmax1" |
    "sink" (gpt-oss learned sink logit per head) | "softpick"),
    gamma (<= 0), zeta (>= 1), alpha (γ = −α / alpha_seq_len, default max_len), gate (see
    `ops.gates.GATE_VARIANTS`), gate_init (π_init in (0, 1)), gate_hidden (MLP gate width),
    gate_scale (1/π_init for fine-tuning mode), context_quant ("after_gate" | "before_gate").

    attention_impl ("materialized" | "blocked" | "fused") picks how attention is computed
    (numerically the same; see `nn.Attention` and docs/scaling.md); attention_block_size is
    the blocked path's tile. The old `fused_attention=True` still loads as attention_impl="fused".
    """

    family: str = "bert"
    vocab_size: int = 30522
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    d_ff: int = 3072
    max_len: int = 512
    type_vocab_size: int = 2
    activation: str = "gelu"
    pre_ln: bool = False
    ln_eps: float = 1e-12
    final_ln: bool = False
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    init_std: float = 0.02
    word_embed_proj_dim: int | None = None  # OPT-350m: 512-wide embeddings projected in/out
    pad_token_id: int = 1  # OPT's padding id (positions skip padding)
    # ViT
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_classes: int = 1000
    patch_ln: bool = False
    # Attention method
    softmax: str = "vanilla"
    gamma: float = 0.0
    zeta: float = 1.0
    alpha: float | None = None
    alpha_seq_len: int | None = None
    gate: str = "none"
    gate_init: float = 0.5
    gate_hidden: int | None = None
    gate_scale: float = 1.0
    context_quant: str = "after_gate"
    attention_impl: str = "materialized"
    attention_block_size: int = 256
    # Numerics
    dtype: str = "float32"
    remat: bool = False
    # Sentence encoder (models/encoder.py): a head-less BERT whose last hidden state is pooled
    # into one embedding per sequence. None builds the family's task model (MLM / LM / classifier).
    pooling: str | None = None  # None | "mean" | "cls" | "max"
    normalize_embeddings: bool = False  # L2-normalise the pooled embedding

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def resolved_gamma(self) -> float:
        """γ after resolving α against the configured sequence length."""
        if self.alpha is None:
            return self.gamma
        return -self.alpha / float(self.alpha_seq_len or self.max_len)

    def validate(self) -> None:
        """Raises ValueError naming the first bad field and its allowed values."""
        if self.family not in MODEL_FAMILIES:
            raise ValueError(f"model.family={self.family!r} is unknown; choose one of "
                             f"{MODEL_FAMILIES}.")
        if self.pooling is not None and (self.pooling not in POOLINGS or self.family != "bert"):
            raise ValueError(f"model.pooling={self.pooling!r} needs family 'bert' and one of "
                             f"{POOLINGS} (None = the family's task head).")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be positive.")
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by "
                             f"model.num_heads={self.num_heads}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={self.activation!r} is unknown; choose one of "
                             f"{tuple(ACTIVATIONS)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is unknown; choose one of "
                             f"{tuple(DTYPES)}.")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must lie in [0, 1).")
        if self.family == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"model.image_size={self.image_size} is not divisible by "
                             f"model.patch_size={self.patch_size}.")
        try:
            validate_attention_fields(self.num_heads, self.softmax, self.gamma, self.zeta,
                                      self.alpha, self.gate, self.gate_init, self.context_quant,
                                      self.attention_impl, self.attention_block_size)
        except ValueError as err:
            raise ValueError(f"model.{err}") from None
        if self.attention_impl == "fused" and self.attention_dropout_rate > 0:
            raise ValueError("model.attention_impl='fused' has no attention dropout; set "
                             "model.attention_dropout_rate=0 or use attention_impl='blocked'.")

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with some fields changed (validated)."""
        return self.from_dict({**dataclasses.asdict(self), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a dict / ConfigDict; unknown keys raise a ValueError listing them."""
        values = dict(values)
        if "fused_attention" in values:  # the field attention_impl replaced (old run configs)
            if values.pop("fused_attention"):
                values["attention_impl"] = "fused"
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**values)
