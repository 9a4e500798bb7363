"""Pure math of the attention gates (paper Eq. 5-7, Table 4; Qwen-style gates).

gated_attention(x) = sigmoid(G(x)) ⊙ softmax(Q Kᵀ / sqrt(D)) V, applied per head before the
heads are concatenated and projected. Shapes: x (B, T, d_model), context (B, T, H, D).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The paper's gates read head h's chunk of the block input (or all of it for all_heads_linear);
# headwise / elementwise are the Qwen "Gated Attention for LLMs" gates from the full input.
GATE_VARIANTS = ("none", "linear", "mlp", "all_heads_linear", "unconditional", "headwise",
                 "elementwise")


def gate_bias_from_pi(pi_init: float) -> float:
    """b = logit(π_init) = −ln(1/π_init − 1), so that sigmoid(b) == π_init at init."""
    if not 0.0 < pi_init < 1.0:
        raise ValueError(f"gate_init (pi_init)={pi_init!r} must lie in the open interval (0, 1); "
                         "the paper uses 0.25 (OPT) or 0.5 (BERT, ViT).")
    return -math.log(1.0 / pi_init - 1.0)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, T, d_model) -> (B, T, H, d_model / H): head h gets contiguous chunk h."""
    d_model = x.shape[-1]
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}.")
    return x.reshape(*x.shape[:-1], num_heads, d_model // num_heads)


def per_head_linear_gate(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Paper's Linear gate: head h reads only chunk h of x.

    Args:
      x: (B, T, d_model) block input.
      kernel: (H, D) one Linear(D -> 1) per head.
      bias: (H,).
    Returns:
      gate logits (B, T, H).
    """
    chunks = split_heads(x, kernel.shape[0])
    return jnp.einsum("...hd,hd->...h", chunks, kernel) + bias


def per_head_mlp_gate(x: jax.Array, hidden_kernel: jax.Array, hidden_bias: jax.Array,
                      out_kernel: jax.Array, out_bias: jax.Array) -> jax.Array:
    """Paper's MLP gate: per head Linear(D -> n) -> ReLU -> Linear(n -> 1) on chunk h.

    Args:
      x: (B, T, d_model); hidden_kernel (H, D, n); hidden_bias (H, n); out_kernel (H, n);
      out_bias (H,).
    Returns:
      gate logits (B, T, H).
    """
    chunks = split_heads(x, hidden_kernel.shape[0])
    hidden = jax.nn.relu(jnp.einsum("...hd,hdn->...hn", chunks, hidden_kernel) + hidden_bias)
    return jnp.einsum("...hn,hn->...h", hidden, out_kernel) + out_bias


def apply_gate(context: jax.Array, gate_logits: jax.Array, scale: float = 1.0) -> jax.Array:
    """Multiplies each head's attention output by sigmoid(gate) (times `scale`).

    Args:
      context: (B, T, H, D) per-head attention output P_h V_h.
      gate_logits: (B, T, H) per head and token, (B, T, H, D) elementwise, or (H,)
        unconditional.
      scale: 1 / π_init in fine-tuning mode, else 1.
    Returns:
      gated context, (B, T, H, D).
    """
    gate = jax.nn.sigmoid(gate_logits.astype(jnp.float32)).astype(context.dtype)
    if gate.ndim < context.ndim:  # per head (B, T, H) or (H,): broadcast over D
        gate = gate[..., None]
    return context * (gate * scale if scale != 1.0 else gate)


def gate_param_count(gate: str, d_model: int, num_heads: int, hidden: int | None = None) -> int:
    """Extra parameters per layer of each gate (paper Table 4 formulas)."""
    head_dim = d_model // num_heads
    hidden = hidden or max(head_dim // 4, 1)
    counts = {
        "none": 0,
        "linear": num_heads * (head_dim + 1),
        "mlp": num_heads * (hidden * (head_dim + 2) + 1),
        "all_heads_linear": num_heads * (d_model + 1),
        "headwise": num_heads * (d_model + 1),
        "elementwise": d_model * (d_model + 1),
        "unconditional": num_heads,
    }
    if gate not in counts:
        raise ValueError(f"gate={gate!r} is unknown; choose one of {GATE_VARIANTS}.")
    return counts[gate]
