"""qtransformers.Attention: self-attention with clipped softmax / gates and quantization markers."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.nn.gates import AttentionGate
from qtransformers.nn.partitioning import (ACT_BATCH, ACT_EMBED, ACT_HEADS, ACT_KV, ACT_LENGTH,
                                           EMBED, HEADS, KV, constrain, partitioned)
from qtransformers.nn.quant_point import QuantPoint, active_attention_points
from qtransformers.ops import attention as attn_ops
from qtransformers.ops import gates as gate_ops
from qtransformers.ops.blocked_attention import blocked_attention
from qtransformers.ops.fused_attention import fused_attention, fused_support_error
from qtransformers.ops.softmax import SOFTMAX_VARIANTS, get_softmax_fn

CONTEXT_QUANT_SITES = ("after_gate", "before_gate")
ATTENTION_IMPLS = ("materialized", "blocked", "fused")


def validate_attention_fields(num_heads: int, softmax: str, gamma: float, zeta: float,
                              alpha: float | None, gate: str, gate_init: float,
                              context_quant: str = "after_gate",
                              attention_impl: str = "materialized",
                              block_size: int = 256) -> None:
    """Raises ValueError naming the first bad attention setting."""
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={attention_impl!r} is unknown; choose one of "
                         f"{ATTENTION_IMPLS}.")
    if attention_impl == "fused" and fused_support_error(softmax):
        raise ValueError(fused_support_error(softmax))
    if block_size <= 0:
        raise ValueError(f"attention_block_size={block_size!r} must be a positive int.")
    if num_heads <= 0:
        raise ValueError(f"num_heads={num_heads!r} must be a positive int.")
    if softmax not in SOFTMAX_VARIANTS:
        raise ValueError(f"softmax={softmax!r} is unknown; choose one of {SOFTMAX_VARIANTS}.")
    get_softmax_fn(softmax, gamma, zeta)
    if alpha is not None and alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be >= 0 (gamma = -alpha / seq_len).")
    if gate not in gate_ops.GATE_VARIANTS:
        raise ValueError(f"gate={gate!r} is unknown; choose one of {gate_ops.GATE_VARIANTS}.")
    if gate != "none":
        gate_ops.gate_bias_from_pi(gate_init)
    if context_quant not in CONTEXT_QUANT_SITES:
        raise ValueError(f"context_quant={context_quant!r} is unknown; choose one of "
                         f"{CONTEXT_QUANT_SITES}.")


class Attention(nn.Module):
    """Multi-head self-attention with the paper's outlier fixes.

    Parameter layout equals `flax.linen.MultiHeadDotProductAttention` (query/key/value kernels
    (d_model, H, D), out kernel (H, D, d_model)), so weights move between the two.

    Attributes:
      num_heads: H; d_model (the input width) must be divisible by it.
      softmax: "vanilla" | "clipped" | "softmax1" | "sink" (a learned logit per head, param
        "sink" (H,), init 0, that takes probability and adds no value; gpt-oss) | "softpick".
      gamma, zeta: clipped softmax clip((ζ−γ)·softmax + γ, 0, 1); γ <= 0, ζ >= 1.
      alpha: if set, γ = −α / T with T = `alpha_seq_len` (else the key length).
      causal: add a causal mask.
      dropout_rate: dropout on the attention probabilities.
      gate: "none" | "linear" | "mlp" | "all_heads_linear" | "unconditional" | "headwise" |
        "elementwise" (see ops.gates). The gate reads this module's input x.
      gate_init: π_init, sigmoid of the gate at init.
      gate_hidden: hidden width of the "mlp" gate (default D / 4).
      gate_scale: multiplies the gate (1 / π_init for the paper's fine-tuning mode).
      context_quant: where the context QuantPoint sits: "after_gate" (reference BERT) or
        "before_gate" (reference OPT).
      attention_impl: "materialized" builds the (B, H, T, T) scores and probabilities (the
        PTQ points 'scores' / 'probs' and the sown 'attention_probs' live only here);
        "blocked" (`ops.blocked_attention`) never builds them: O(T · block_size) memory for
        every softmax variant, mask, gate and dropout, numerically the same; "fused"
        (`jax.nn.dot_product_attention`) for vanilla / softmax1 / sink without dropout. With
        blocked or fused, a calibration or quantization that needs 'scores' / 'probs' raises.
      block_size: query and key tile of the blocked path.
    Call: x (B, T, d_model), padding_mask (B, T) True for real tokens, attention_mask
      broadcastable to (B, H, T, T) -> (B, T, out_features or d_model).
    """

    num_heads: int
    softmax: str = "vanilla"
    gamma: float = 0.0
    zeta: float = 1.0
    alpha: float | None = None
    alpha_seq_len: int | None = None
    causal: bool = False
    dropout_rate: float = 0.0
    gate: str = "none"
    gate_init: float = 0.5
    gate_hidden: int | None = None
    gate_scale: float = 1.0
    context_quant: str = "after_gate"
    attention_impl: str = "materialized"
    block_size: int = 256
    fused: bool = False  # replaced by attention_impl; True raises a line naming it
    out_features: int | None = None
    use_bias: bool = True
    kernel_init: Any = nn.initializers.normal(0.02)
    gate_kernel_init: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def setup(self):
        if self.fused:
            raise ValueError("Attention(fused=True) is replaced by attention_impl='fused' "
                             "(or 'blocked' for every softmax variant).")
        validate_attention_fields(self.num_heads, self.softmax, self.gamma, self.zeta, self.alpha,
                                  self.gate, self.gate_init, self.context_quant,
                                  self.attention_impl, self.block_size)

    def _check_no_attention_quant_points(self) -> None:
        active = active_attention_points(self)
        if active:
            raise ValueError(f"QuantPoints {active} at {'/'.join(map(str, self.path))} need the "
                             "(B, H, T, T) attention tensors; calibrate / quantize them with "
                             f"attention_impl='materialized' (this module has "
                             f"{self.attention_impl!r}; the paths are numerically the same).")

    def _projection(self, features, axis, kernel_axes, bias_axes, name):
        return nn.DenseGeneral(
            features, axis=axis, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, name=name,
            kernel_init=partitioned(self.kernel_init, kernel_axes),
            bias_init=partitioned(nn.initializers.zeros, bias_axes))

    @nn.compact
    def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        d_model = x.shape[-1]
        if d_model % self.num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={self.num_heads}.")
        head_dim = d_model // self.num_heads
        seq_len = x.shape[-2]
        act_axes = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_KV)

        qkv = []
        for name in ("query", "key", "value"):
            y = self._projection((self.num_heads, head_dim), -1, (EMBED, HEADS, KV), (HEADS, KV),
                                 name)(x)
            qkv.append(constrain(QuantPoint(name=f"{name}_output")(y), act_axes))
        query, key, value = qkv

        dropout_active = not deterministic and self.dropout_rate > 0.0
        dropout_rng = self.make_rng("dropout") if dropout_active else None
        sink = (self.param("sink", partitioned(nn.initializers.zeros, (HEADS,)),
                           (self.num_heads,), self.param_dtype)
                if self.softmax == "sink" else None)
        gamma = attn_ops.resolve_gamma(self.gamma, self.alpha, seq_len, self.alpha_seq_len)
        if self.attention_impl != "materialized":
            self._check_no_attention_quant_points()
        if self.attention_impl == "blocked":
            context = blocked_attention(
                query, key, value, softmax=self.softmax, gamma=gamma, zeta=self.zeta, sink=sink,
                key_mask=padding_mask, mask=attention_mask, causal=self.causal,
                dropout_rate=self.dropout_rate if dropout_active else 0.0,
                dropout_rng=dropout_rng, block_q=self.block_size, block_k=self.block_size,
                precision=self.precision)
        elif self.attention_impl == "fused":
            error = fused_support_error(self.softmax, dropout_active)
            if error:
                raise ValueError(error)
            context = fused_attention(
                query, key, value, softmax=self.softmax, sink=sink, causal=self.causal,
                mask=attn_ops.combine_masks(
                    None if padding_mask is None
                    else attn_ops.padding_to_attention_mask(padding_mask), attention_mask))
        else:
            mask = attn_ops.combine_masks(
                None if padding_mask is None else attn_ops.padding_to_attention_mask(padding_mask),
                attention_mask,
                attn_ops.causal_mask(seq_len) if self.causal else None)
            scores = QuantPoint(name="scores")(attn_ops.attention_scores(query, key,
                                                                         self.precision))
            softmax_fn = get_softmax_fn(self.softmax, gamma, self.zeta,
                                        None if sink is None else sink[:, None, None])
            probs = QuantPoint(name="probs")(softmax_fn(scores, axis=-1, where=mask))
            self.sow("intermediates", "attention_probs", probs)
            if dropout_active:
                probs = attn_ops.positional_attention_dropout(probs, self.dropout_rate,
                                                              dropout_rng)
            context = attn_ops.attention_context(probs, value, self.precision)
        context = constrain(context, act_axes)

        if self.context_quant == "before_gate":
            context = QuantPoint(name="context")(context)
        if self.gate != "none":
            gate_logits = AttentionGate(
                self.gate, self.num_heads, self.gate_init, self.gate_hidden,
                kernel_init=self.gate_kernel_init or self.kernel_init,
                param_dtype=self.param_dtype, name="gate")(x)
            self.sow("intermediates", "gate_values", jax.nn.sigmoid(gate_logits))
            context = gate_ops.apply_gate(context, gate_logits, self.gate_scale)
        if self.context_quant == "after_gate":
            context = QuantPoint(name="context")(context)

        out = self._projection(self.out_features or d_model, (-2, -1), (HEADS, KV, EMBED),
                               (EMBED,), "out")(context)
        return constrain(QuantPoint(name="out_output")(out), (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
