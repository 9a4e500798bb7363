"""Logical axis names for parameters and activations (MaxText style).

Parameters and activations carry logical names; the trainer maps them to mesh axes with the
rules in its config (`nn.logical_axis_rules`), so one model runs data-parallel, FSDP or
tensor-parallel without code changes. Outside such a context the annotations do nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

# Parameter axes.
EMBED, VOCAB, HEADS, KV, MLP, POSITION, CLASSES = (
    "embed", "vocab", "heads", "kv", "mlp", "position", "classes")
# Activation axes.
ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_KV, ACT_MLP, ACT_VOCAB = (
    "act_batch", "act_length", "act_embed", "act_heads", "act_kv", "act_mlp", "act_vocab")

# Defaults for a (data, fsdp, tensor) mesh; configs may override these.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    (ACT_BATCH, ("data", "fsdp")),
    (ACT_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV, None),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (VOCAB, "tensor"),
    (HEADS, "tensor"),
    (KV, None),
    (MLP, "tensor"),
    (POSITION, None),
    (CLASSES, None),
)


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
    """An initializer whose parameter carries the logical axis `names`."""
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names (no-op without rules/mesh)."""
    return nn.with_logical_constraint(x, tuple(names))
