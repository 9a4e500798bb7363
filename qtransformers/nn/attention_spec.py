"""AttentionSpec: the attention method (softmax variant, gate, implementation) as one frozen,
self-validating value, given whole to `Attention`, `NnxAttention` and `ModelConfig.attention`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qtransformers.ops import gates as gate_ops
from qtransformers.ops.fused_attention import fused_support_error
from qtransformers.ops.softmax import SOFTMAX_VARIANTS, gamma_from_alpha, get_softmax_fn

CONTEXT_QUANT_SITES = ("after_gate", "before_gate")
ATTENTION_IMPLS = ("materialized", "blocked", "fused")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How attention computes its probabilities and output (paper.md §2-3).

    The field names are the keys of the model config section (`model.softmax`,
    `model.alpha`, ...), so a config key, a spec field and an error message name one thing.

    Attributes:
      softmax: "vanilla" | "clipped" | "softmax1" | "sink" (a learned logit per head that takes
        probability and adds no value; gpt-oss) | "softpick".
      gamma, zeta: clipped softmax clip((ζ−γ)·softmax + γ, 0, 1); γ <= 0, ζ >= 1.
      alpha: if set, γ = −α / T and `gamma` is ignored.
      alpha_seq_len: T of γ = −α / T: the sequence length the model trains at. Required with
        alpha; `ModelConfig.from_dict` fills it (models/config.py `sequence_length_of`).
      gate: one of `ops.gates.GATE_VARIANTS` ("none" = no gate).
      gate_init: π_init in (0, 1), the gate's sigmoid at init.
      gate_hidden: hidden width of the "mlp" gate (None = head_dim / 4).
      gate_scale: multiplies the gate (1 / π_init for the paper's fine-tuning mode).
      context_quant: where the context QuantPoint sits: "after_gate" (reference BERT) or
        "before_gate" (reference OPT).
      attention_impl: "materialized" (the (B, H, T, T) scores / probabilities exist: PTQ points
        'scores' / 'probs'), "blocked" (O(T · block) memory, every variant) or "fused"
        (`jax.nn.dot_product_attention`: vanilla / softmax1 / sink, no dropout).
      attention_block_size: query and key tile of the blocked path.
      attention_dropout_rate: dropout on the attention probabilities, in [0, 1).
    """

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
    attention_dropout_rate: float = 0.0

    def __post_init__(self):
        self.validate()

    @property
    def resolved_gamma(self) -> float:
        """The γ the softmax uses: `gamma`, or −α / alpha_seq_len when α is set."""
        if self.alpha is None:
            return self.gamma
        return gamma_from_alpha(self.alpha, self.alpha_seq_len)

    @property
    def has_gate(self) -> bool:
        return self.gate != "none"

    def validate(self) -> None:
        """Raises ValueError naming the first bad field, its value and the allowed values."""
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is unknown; choose one of "
                             f"{ATTENTION_IMPLS}.")
        if self.attention_impl == "fused" and fused_support_error(self.softmax):
            raise ValueError(fused_support_error(self.softmax))
        if self.attention_impl == "fused" and self.attention_dropout_rate > 0:
            raise ValueError("attention_impl='fused' has no attention dropout; set "
                             "attention_dropout_rate=0 or use attention_impl='blocked'.")
        if not isinstance(self.attention_block_size, int) or self.attention_block_size <= 0:
            raise ValueError(f"attention_block_size={self.attention_block_size!r} must be a "
                             "positive int.")
        if not 0.0 <= self.attention_dropout_rate < 1.0:
            raise ValueError(f"attention_dropout_rate={self.attention_dropout_rate!r} must lie "
                             "in [0, 1).")
        if self.softmax not in SOFTMAX_VARIANTS:
            raise ValueError(f"softmax={self.softmax!r} is unknown; choose one of "
                             f"{SOFTMAX_VARIANTS}.")
        if self.alpha is not None:
            if self.alpha < 0:
                raise ValueError(f"alpha={self.alpha!r} must be >= 0 (gamma = -alpha / "
                                 "alpha_seq_len).")
            if self.alpha_seq_len is None or self.alpha_seq_len <= 0:
                raise ValueError(f"alpha={self.alpha!r} needs alpha_seq_len, the sequence length "
                                 "T of gamma = -alpha / T (the length the model trains at), a "
                                 f"positive int; got {self.alpha_seq_len!r}.")
        get_softmax_fn(self.softmax, self.resolved_gamma, self.zeta)  # gamma / zeta ranges
        if self.gate not in gate_ops.GATE_VARIANTS:
            raise ValueError(f"gate={self.gate!r} is unknown; choose one of "
                             f"{gate_ops.GATE_VARIANTS}.")
        if self.has_gate:
            gate_ops.gate_bias_from_pi(self.gate_init)
        if self.gate_hidden is not None and self.gate_hidden <= 0:
            raise ValueError(f"gate_hidden={self.gate_hidden!r} must be a positive int or None.")
        if self.context_quant not in CONTEXT_QUANT_SITES:
            raise ValueError(f"context_quant={self.context_quant!r} is unknown; choose one of "
                             f"{CONTEXT_QUANT_SITES}.")

    def replace(self, **changes: Any) -> "AttentionSpec":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AttentionSpec":
        """Builds from a mapping of field values; unknown keys raise a ValueError listing them."""
        unknown = sorted(set(values) - set(ATTENTION_FIELDS))
        if unknown:
            raise ValueError(f"unknown attention keys {unknown}; known keys: "
                             f"{sorted(ATTENTION_FIELDS)}.")
        return cls(**values)


ATTENTION_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AttentionSpec))
