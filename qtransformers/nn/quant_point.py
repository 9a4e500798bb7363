"""QuantPoint: a named identity marker at every activation site that the paper quantizes."""
import flax.linen as nn
import jax


class QuantPoint(nn.Module):
    """Identity marker at an activation site (paper.md §4).

    The PTQ transform finds these by their module path. Without quantization collections
    this is the identity: `x -> x`, any shape.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x
