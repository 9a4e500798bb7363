"""AttentionGate: the Flax Linen module around the pure gate math in `qtransformers.ops.gates`."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.nn.partitioning import EMBED, HEADS, KV, MLP, partitioned
from qtransformers.ops import gates as gate_ops


class AttentionGate(nn.Module):
    """Gate logits for each head (or feature) of an attention layer.

    Attributes:
      gate: a name from `ops.gates.GATE_VARIANTS` other than "none".
      num_heads: H.
      pi_init: sigmoid(gate) at init (bias = logit(pi_init)).
      hidden: hidden width of the "mlp" gate (default D / 4, as the reference code).
      kernel_init: initializer of the gate weights.
    Call: x (B, T, d_model) block input -> logits (B, T, H), (B, T, H, D) for "elementwise",
      or (H,) for "unconditional".
    """

    gate: str
    num_heads: int
    pi_init: float = 0.5
    hidden: int | None = None
    kernel_init: Any = nn.initializers.normal(0.02)
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_model, heads = x.shape[-1], self.num_heads
        head_dim = d_model // heads
        bias_value = gate_ops.gate_bias_from_pi(self.pi_init)
        bias_init = nn.initializers.constant(bias_value)

        if self.gate == "linear":
            kernel = self.param("kernel", partitioned(self.kernel_init, (HEADS, KV)),
                                (heads, head_dim), self.param_dtype)
            bias = self.param("bias", partitioned(bias_init, (HEADS,)), (heads,), self.param_dtype)
            return gate_ops.per_head_linear_gate(x, kernel, bias)
        if self.gate == "mlp":
            hidden = self.hidden or max(head_dim // 4, 1)
            w1 = self.param("hidden_kernel", partitioned(self.kernel_init, (HEADS, KV, None)),
                            (heads, head_dim, hidden), self.param_dtype)
            b1 = self.param("hidden_bias", partitioned(nn.initializers.zeros, (HEADS, None)),
                            (heads, hidden), self.param_dtype)
            w2 = self.param("out_kernel", partitioned(self.kernel_init, (HEADS, None)),
                            (heads, hidden), self.param_dtype)
            b2 = self.param("out_bias", partitioned(bias_init, (HEADS,)), (heads,),
                            self.param_dtype)
            return gate_ops.per_head_mlp_gate(x, w1, b1, w2, b2)
        if self.gate == "unconditional":
            return self.param("logits", partitioned(bias_init, (HEADS,)), (heads,),
                              self.param_dtype)
        if self.gate in ("all_heads_linear", "headwise", "elementwise"):
            # All three read the full block input; they differ in output width and origin
            # (all_heads_linear: paper Table 4; headwise / elementwise: Qwen's gates).
            elementwise = self.gate == "elementwise"
            features = heads * head_dim if elementwise else heads
            out_axis = MLP if elementwise else HEADS
            logits = nn.Dense(
                features, name="dense", param_dtype=self.param_dtype,
                kernel_init=partitioned(self.kernel_init, (EMBED, out_axis)),
                bias_init=partitioned(bias_init, (out_axis,)))(x)
            return logits.reshape(*x.shape[:-1], heads, head_dim) if elementwise else logits
        raise ValueError(f"gate={self.gate!r} is unknown; choose one of "
                         f"{gate_ops.GATE_VARIANTS}.")
