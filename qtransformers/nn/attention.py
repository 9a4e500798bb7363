"""qtransformers.Attention: self-attention with clipped softmax / gates and quantization markers."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.nn.attention_spec import AttentionSpec
from qtransformers.nn.gates import AttentionGate
from qtransformers.nn.partitioning import (ACT_BATCH, ACT_EMBED, ACT_HEADS, ACT_KV, ACT_LENGTH,
                                           EMBED, HEADS, KV, constrain, partitioned)
from qtransformers.nn.quant_point import QuantPoint, active_attention_points
from qtransformers.ops import attention as attn_ops
from qtransformers.ops import gates as gate_ops
from qtransformers.ops.blocked_attention import blocked_attention
from qtransformers.ops.fused_attention import fused_attention
from qtransformers.ops.softmax import get_softmax_fn


class Attention(nn.Module):
    """Multi-head self-attention with the paper's outlier fixes.

    Parameter layout equals `flax.linen.MultiHeadDotProductAttention` (query/key/value kernels
    (d_model, H, D), out kernel (H, D, d_model)), so weights move between the two.

    Attributes:
      num_heads: H; d_model (the input width) must be divisible by it.
      spec: the attention method (`AttentionSpec`: softmax variant, γ / ζ or α with T, gate,
        context QuantPoint site, implementation, block size, attention dropout), read whole.
        With attention_impl "blocked" or "fused" the (B, H, T, T) tensors, their PTQ points
        'scores' / 'probs' and the sown 'attention_probs' do not exist; a calibration or
        quantization that needs them raises.
      causal: add a causal mask.
      out_features: output width (default d_model).
    Call: x (B, T, d_model), padding_mask (B, T) True for real tokens, attention_mask
      broadcastable to (B, H, T, T) -> (B, T, out_features or d_model).
    """

    num_heads: int
    spec: AttentionSpec = AttentionSpec()
    causal: bool = False
    out_features: int | None = None
    use_bias: bool = True
    kernel_init: Any = nn.initializers.normal(0.02)
    gate_kernel_init: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def _check_no_attention_quant_points(self) -> None:
        active = active_attention_points(self)
        if active:
            raise ValueError(f"QuantPoints {active} at {'/'.join(map(str, self.path))} need the "
                             "(B, H, T, T) attention tensors; calibrate / quantize them with "
                             f"attention_impl='materialized' (this module has "
                             f"{self.spec.attention_impl!r}; the paths are numerically the same).")

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
        if self.num_heads <= 0 or d_model % self.num_heads:
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

        spec = self.spec
        dropout_rate = spec.attention_dropout_rate if not deterministic else 0.0
        dropout_rng = self.make_rng("dropout") if dropout_rate > 0.0 else None
        sink = (self.param("sink", partitioned(nn.initializers.zeros, (HEADS,)),
                           (self.num_heads,), self.param_dtype)
                if spec.softmax == "sink" else None)
        if spec.attention_impl != "materialized":
            self._check_no_attention_quant_points()
        if spec.attention_impl == "blocked":
            context = blocked_attention(
                query, key, value, softmax=spec.softmax, gamma=spec.resolved_gamma,
                zeta=spec.zeta, sink=sink, key_mask=padding_mask, mask=attention_mask,
                causal=self.causal, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                block_q=spec.attention_block_size, block_k=spec.attention_block_size,
                precision=self.precision)
        elif spec.attention_impl == "fused":  # the spec rules out dropout with "fused"
            context = fused_attention(
                query, key, value, softmax=spec.softmax, sink=sink, causal=self.causal,
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
            softmax_fn = get_softmax_fn(spec.softmax, spec.resolved_gamma, spec.zeta,
                                        None if sink is None else sink[:, None, None])
            probs = QuantPoint(name="probs")(softmax_fn(scores, axis=-1, where=mask))
            self.sow("intermediates", "attention_probs", probs)
            probs = attn_ops.positional_attention_dropout(probs, dropout_rate, dropout_rng)
            context = attn_ops.attention_context(probs, value, self.precision)
        context = constrain(context, act_axes)

        if spec.context_quant == "before_gate":
            context = QuantPoint(name="context")(context)
        if spec.has_gate:
            gate_logits = AttentionGate(
                spec.gate, self.num_heads, spec.gate_init, spec.gate_hidden,
                kernel_init=self.gate_kernel_init or self.kernel_init,
                param_dtype=self.param_dtype, name="gate")(x)
            self.sow("intermediates", "gate_values", jax.nn.sigmoid(gate_logits))
            context = gate_ops.apply_gate(context, gate_logits, spec.gate_scale)
        if spec.context_quant == "after_gate":
            context = QuantPoint(name="context")(context)

        out = self._projection(self.out_features or d_model, (-2, -1), (HEADS, KV, EMBED),
                               (EMBED,), "out")(context)
        return constrain(QuantPoint(name="out_output")(out), (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
