"""Pytree helpers shared across layers (no JAX model code; imported by quant, train, ...)."""
from __future__ import annotations

from typing import Any


def path_to_str(path: tuple[Any, ...]) -> str:
    """'/'-joined names of a jax key path (DictKey / GetAttrKey / SequenceKey entries).

    Example: the path of params['decoder']['layers_0']['attention']['query']['kernel'] ->
    'decoder/layers_0/attention/query/kernel'.
    """
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)
