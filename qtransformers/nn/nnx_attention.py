"""NNX twin of `qtransformers.Attention`, built on the same pure functions in `qtransformers.ops`.

Parameter layout equals the Linen module's, so `nnx_attention_from_linen` copies weights over.
It has no QuantPoints: PTQ runs on the Linen models.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qtransformers.nn.attention_spec import AttentionSpec
from qtransformers.ops import attention as attn_ops
from qtransformers.ops import gates as gate_ops
from qtransformers.ops.blocked_attention import blocked_attention
from qtransformers.ops.fused_attention import fused_attention
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

    Reads the same `AttentionSpec` as `qtransformers.Attention` (its context_quant has no
    effect here: no QuantPoints).
    Call: x (B, T, d_model), padding_mask (B, T), attention_mask, deterministic
      -> (B, T, d_model).
    """

    def __init__(self, d_model: int, num_heads: int, spec: AttentionSpec = AttentionSpec(), *,
                 causal: bool = False, kernel_init: Any = nnx.initializers.normal(0.02),
                 rngs: nnx.Rngs):
        if num_heads <= 0 or d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}.")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.spec, self.causal = spec, causal
        self.sink = nnx.Param(jnp.zeros((num_heads,))) if spec.softmax == "sink" else None
        heads = (num_heads, self.head_dim)
        for name in ("query", "key", "value"):
            setattr(self, name, nnx.LinearGeneral(d_model, heads, kernel_init=kernel_init,
                                                  rngs=rngs))
        self.out = nnx.LinearGeneral(heads, d_model, axis=(-2, -1), kernel_init=kernel_init,
                                     rngs=rngs)
        self.gate = (NnxAttentionGate(spec.gate, d_model, num_heads, spec.gate_init,
                                      spec.gate_hidden, kernel_init=kernel_init, rngs=rngs)
                     if spec.has_gate else None)
        self.rngs = rngs.fork() if spec.attention_dropout_rate > 0 else None

    def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        spec, seq_len = self.spec, x.shape[-2]
        query, key, value = self.query(x), self.key(x), self.value(x)
        padding = (None if padding_mask is None
                   else attn_ops.padding_to_attention_mask(padding_mask))
        sink = None if self.sink is None else self.sink[...]
        dropout_rate = 0.0 if deterministic else spec.attention_dropout_rate
        rng = self.rngs.dropout() if dropout_rate > 0 else None
        if spec.attention_impl == "blocked":
            context = blocked_attention(
                query, key, value, softmax=spec.softmax, gamma=spec.resolved_gamma,
                zeta=spec.zeta, sink=sink, key_mask=padding_mask, mask=attention_mask,
                causal=self.causal, dropout_rate=dropout_rate, dropout_rng=rng,
                block_q=spec.attention_block_size, block_k=spec.attention_block_size)
        elif spec.attention_impl == "fused":  # the spec rules out dropout with "fused"
            context = fused_attention(query, key, value, softmax=spec.softmax, sink=sink,
                                      causal=self.causal,
                                      mask=attn_ops.combine_masks(padding, attention_mask))
        else:
            mask = attn_ops.combine_masks(
                padding, attention_mask, attn_ops.causal_mask(seq_len) if self.causal else None)
            scores = attn_ops.attention_scores(query, key)
            probs = get_softmax_fn(spec.softmax, spec.resolved_gamma, spec.zeta,
                                   None if sink is None else sink[:, None, None])(
                scores, axis=-1, where=mask)
            probs = attn_ops.positional_attention_dropout(probs, dropout_rate, rng)
            context = attn_ops.attention_context(probs, value)
        if self.gate is not None:
            context = gate_ops.apply_gate(context, self.gate(x), spec.gate_scale)
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
