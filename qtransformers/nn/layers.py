"""Small Linen building blocks with logical axis names and QuantPoints on their outputs."""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtransformers.nn.partitioning import (ACT_BATCH, ACT_EMBED, ACT_LENGTH, ACT_MLP, EMBED, MLP,
                                           constrain, partitioned)
from qtransformers.nn.quant_point import QuantPoint

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf GELU (BERT, ViT)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,  # OPT
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Activation function by name; ValueError lists the known names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is unknown; choose one of {tuple(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def dense(features: int, in_axis: str, out_axis: str, kernel_init: Any, name: str,
          dtype: Any = None, use_bias: bool = True) -> nn.Dense:
    """nn.Dense whose kernel is (in_axis, out_axis) and bias (out_axis,) in logical names."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=partitioned(kernel_init, (in_axis, out_axis)),
                    bias_init=partitioned(nn.initializers.zeros, (out_axis,)))


class LayerNormQ(nn.Module):
    """LayerNorm over the last axis followed by a QuantPoint "output" on its result.

    Call: x (..., d) -> (..., d).
    """

    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, name="norm",
                         scale_init=partitioned(nn.initializers.ones, (EMBED,)),
                         bias_init=partitioned(nn.initializers.zeros, (EMBED,)))(x)
        return QuantPoint(name="output")(y)


class MLP(nn.Module):
    """Feed-forward block: Dense(d_ff) -> activation -> Dense(d_model), QuantPoints after each.

    The FFN-in QuantPoint sits after the activation function, as in the reference.
    Call: x (B, T, d_model) -> (B, T, d_model).
    """

    d_ff: int
    activation: str = "gelu"
    kernel_init: Any = nn.initializers.normal(0.02)
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        h = dense(self.d_ff, EMBED, MLP, self.kernel_init, "intermediate", self.dtype)(x)
        h = QuantPoint(name="intermediate_output")(act(h))
        h = constrain(h, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
        y = dense(x.shape[-1], MLP, EMBED, self.kernel_init, "output", self.dtype)(h)
        return constrain(QuantPoint(name="output_output")(y), (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
