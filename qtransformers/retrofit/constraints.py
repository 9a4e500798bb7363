"""Weight clipping: keep each pretrained weight matrix inside ±k·σ of its source tensor.

The max |x| penalty removes MiniLM's activation outlier but not the weights that wrote it: the
MLP output kernels keep entries near 8 against a median |w| of 0.03 (per-tensor min-max W8 then
spends most of its grid on them), and AdamW moves a weight by about lr per step, so no penalty
can shrink them within a short fine-tune. A projection can: after every update each clipped
tensor is put back into [−k·σ, k·σ], σ the standard deviation of the source model's tensor (fixed
for the whole run, so resuming finds the same bounds), and the distillation heals what the clip
changed.

    bounds = clip_bounds(params, k)        # {path: bound or None}, computed once
    params = clip_weights(params, bounds)  # jittable; leaves without a bound untouched

Clipped: Dense kernels and embedding tables (the paths the PTQ quantizes per tensor with
min-max), never the gates the retrofit adds, biases or LayerNorm parameters.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qtransformers.pytree import path_to_str
from qtransformers.retrofit.source import is_new_param

CLIPPED = re.compile(r"(^|/)(kernel|embedding)$")


def is_clipped(path: str) -> bool:
    """A '/'-joined parameter path that weight clipping constrains (module docstring)."""
    return bool(CLIPPED.search(path)) and not is_new_param(path)


def clip_bounds(params: Any, k: float) -> Any:
    """Per leaf: k × std of that tensor (a Python float) where is_clipped, else None.

    k <= 0 turns clipping off (every leaf None)."""
    def bound(path: tuple[Any, ...], leaf: Any) -> float | None:
        if k <= 0 or not is_clipped(path_to_str(path)):
            return None
        return float(k * np.std(np.asarray(leaf, np.float64)))
    return jax.tree_util.tree_map_with_path(bound, params)


def clip_weights(params: Any, bounds: Any) -> Any:
    """params with each leaf clipped to [−bound, bound] (shapes unchanged; None: as is)."""
    return jax.tree_util.tree_map(
        lambda b, p: p if b is None else jnp.clip(p, -b, b), bounds, params,
        is_leaf=lambda b: b is None)

