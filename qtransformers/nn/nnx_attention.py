"""NNX twin of `qtransformers.Attention`, built on the same pure functions in `qtransformers.ops`.

Parameter layout equals the Linen module's, so `nnx_attention_from_linen` copies weights over.
It has no QuantPoints: PTQ runs on the Linen models.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qtransformers.nn.attention import validate_attention_fields
from qtransformers.ops import attention as attn_ops
from qtransformers.ops import gates as gate_ops
from qtransformers.ops.blocked_attention import blocked_attention
from qtransformers.ops.fused_attention import fused_attention, fused_support_error
from qtransformers.ops.softmax import get_softmax_fn


class NnxAttentionGate(nnx.Module):
    """Gate logits for each head, as `qtransformers.nn.AttentionGate` (same parameter names)."""

    def __init__(self, gate: str, d_model: int, num_heads: int, pi_init: float = 0.5,
                 hidden: int | None = None, *, kernel_init: Any = nnx.initializers.normal(0.02),
                 rngs: nnx.Rngs):
        self.gate, self.num_heads = gate, num_heads
        head_dim = d_model // num_heads
        bias = gate_ops.gate_bias_from_pi(pi_init)
        if gate == "linear":
            self.kernel = nnx.Param(kernel_init(rngs.params(), (num_heads, head_dim)))
            self.bias = nnx.Param(jnp.full((num_heads,), bias))
        elif gate == "mlp":
            hidden = hidden or max(head_dim // 4, 1)
            self.hidden_kernel = nnx.Param(kernel_init(rngs.params(), (num_heads, head_dim, hidden)))
            self.hidden_bias = nnx.Param(jnp.zeros((num_heads, hidden)))
            self.out_kernel = nnx.Param(kernel_init(rngs.params(), (num_heads, hidden)))
            self.out_bias = nnx.Param(jnp.full((num_heads,), bias))
        elif gate == "unconditional":
            self.logits = nnx.Param(jnp.full((num_heads,), bias))
        elif gate in ("all_heads_linear", "headwise", "elementwise"):
            features = d_model if gate == "elementwise" else num_heads
            self.dense = nnx.Linear(d_model, features, kernel_init=kernel_init,
                                    bias_init=nnx.initializers.constant(bias), rngs=rngs)
        else:
            raise ValueError(f"gate={gate!r} is unknown; choose one of {gate_ops.GATE_VARIANTS}.")

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, T, d_model) -> logits (B, T, H), (B, T, H, D) or (H,)."""
        if self.gate == "linear":
            return gate_ops.per_head_linear_gate(x, self.kernel[...], self.bias[...])
        if self.gate == "mlp":
            return gate_ops.per_head_mlp_gate(x, self.hidden_kernel[...], self.hidden_bias[...],
                                              self.out_kernel[...], self.out_bias[...])
        if self.gate == "unconditional":
            return self.logits[...]
        logits = self.dense(x)
        if self.gate == "elementwise":
            return logits.reshape(*x.shape[:-1], self.num_heads, -1)
        return logits


class NnxAttention(nnx.Module):
    """Self-attention with the paper's softmax variants and gates (NNX API).

    Same fields as `qtransformers.Attention` (see its docstring), given to the constructor.
    Call: x (B, T, d_model), padding_mask (B, T), attention_mask, deterministic
      -> (B, T, d_model).
    """

    def __init__(self, d_model: int, num_heads: int, *, softmax: str = "vanilla",
                 gamma: float = 0.0, zeta: float = 1.0, alpha: float | None = None,
                 alpha_seq_len: int | None = None, causal: bool = False,
                 dropout_rate: float = 0.0, gate: str = "none", gate_init: float = 0.5,
                 gate_hidden: int | None = None, gate_scale: float = 1.0,
                 attention_impl: str = "materialized", block_size: int = 256,
                 kernel_init: Any = nnx.initializers.normal(0.02), rngs: nnx.Rngs):
        validate_attention_fields(num_heads, softmax, gamma, zeta, alpha, gate, gate_init,
                                  attention_impl=attention_impl, block_size=block_size)
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}.")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.softmax, self.gamma, self.zeta = softmax, gamma, zeta
        self.alpha, self.alpha_seq_len, self.causal = alpha, alpha_seq_len, causal
        self.dropout_rate, self.gate_scale = dropout_rate, gate_scale
        self.attention_impl, self.block_size = attention_impl, block_size
        self.sink = nnx.Param(jnp.zeros((num_heads,))) if softmax == "sink" else None
        heads = (num_heads, self.head_dim)
        for name in ("query", "key", "value"):
            setattr(self, name, nnx.LinearGeneral(d_model, heads, kernel_init=kernel_init,
                                                  rngs=rngs))
        self.out = nnx.LinearGeneral(heads, d_model, axis=(-2, -1), kernel_init=kernel_init,
                                     rngs=rngs)
        self.gate = (None if gate == "none" else NnxAttentionGate(
            gate, d_model, num_heads, gate_init, gate_hidden, kernel_init=kernel_init, rngs=rngs))
        self.rngs = rngs.fork() if dropout_rate > 0 else None

    def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        seq_len = x.shape[-2]
        query, key, value = self.query(x), self.key(x), self.value(x)
        padding = (None if padding_mask is None
                   else attn_ops.padding_to_attention_mask(padding_mask))
        gamma = attn_ops.resolve_gamma(self.gamma, self.alpha, seq_len, self.alpha_seq_len)
        sink = None if self.sink is None else self.sink[...]
        dropout = not deterministic and self.dropout_rate > 0
        rng = self.rngs.dropout() if dropout else None
        if self.attention_impl == "blocked":
            context = blocked_attention(
                query, key, value, softmax=self.softmax, gamma=gamma, zeta=self.zeta, sink=sink,
                key_mask=padding_mask, mask=attention_mask, causal=self.causal,
                dropout_rate=self.dropout_rate if dropout else 0.0, dropout_rng=rng,
                block_q=self.block_size, block_k=self.block_size)
        elif self.attention_impl == "fused":
            if fused_support_error(self.softmax, dropout):
                raise ValueError(fused_support_error(self.softmax, dropout))
            context = fused_attention(query, key, value, softmax=self.softmax, sink=sink,
                                      causal=self.causal,
                                      mask=attn_ops.combine_masks(padding, attention_mask))
        else:
            mask = attn_ops.combine_masks(
                padding, attention_mask, attn_ops.causal_mask(seq_len) if self.causal else None)
            scores = attn_ops.attention_scores(query, key)
            probs = get_softmax_fn(self.softmax, gamma, self.zeta,
                                   None if sink is None else sink[:, None, None])(
                scores, axis=-1, where=mask)
            if dropout:
                probs = attn_ops.positional_attention_dropout(probs, self.dropout_rate, rng)
            context = attn_ops.attention_context(probs, value)
        if self.gate is not None:
            context = gate_ops.apply_gate(context, self.gate(x), self.gate_scale)
        return self.out(context)


def nnx_attention_from_linen(module: NnxAttention, linen_params: dict) -> NnxAttention:
    """Copies a Linen `Attention`'s params (same names and shapes) into an NnxAttention in place."""
    from flax.linen import meta

    params = meta.unbox(linen_params)
    for name in ("query", "key", "value", "out"):
        getattr(module, name).kernel[...] = params[name]["kernel"]
        getattr(module, name).bias[...] = params[name]["bias"]
    if module.sink is not None:
        module.sink[...] = params["sink"]
    if module.gate is not None:
        gate_params = params["gate"]
        if "dense" in gate_params:
            module.gate.dense.kernel[...] = gate_params["dense"]["kernel"]
            module.gate.dense.bias[...] = gate_params["dense"]["bias"]
        else:
            for name, value in gate_params.items():
                getattr(module.gate, name)[...] = value
    return module
