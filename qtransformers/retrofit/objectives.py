"""Retrofit objectives: distillation from the frozen original and pressure on activation size.

Pure functions (shapes below); `forward` runs a model once and returns what they need.
mask is (B, T), 1 / True for real tokens; padded tokens never count.

- embedding_distillation: mean over samples of 1 − cos(student, teacher) of the pooled
  embeddings.
- hidden_distillation: per layer, the mean squared difference of the block outputs over real
  tokens and channels; averaged over layers.
- logits_distillation: τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)) per real token, averaged
  (Hinton et al.; needs a model with an MLM / LM head).
- max_abs_penalty: Σ over sites of the mean over samples of the sample's max |x| over its real
  tokens and channels (the field probe's recipe, docs/field.md, on every residual sum).
- kurtosis_penalty: Σ over sites of the mean over samples of the non-excess kurtosis of the
  sample's real activations (ops.metrics.kurtosis_per_sample).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from qtransformers.ops.metrics import kurtosis_per_sample

RESIDUAL_SITES = ("attention_residual", "mlp_residual")
PENALTY_SITES = ("residual", "block_output", "both")


def embedding_distillation(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """mean_b (1 − cos(student_b, teacher_b)); student, teacher (B, d) -> ()."""
    s = student / jnp.maximum(jnp.linalg.norm(student, axis=-1, keepdims=True), 1e-12)
    t = teacher / jnp.maximum(jnp.linalg.norm(teacher, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(1.0 - jnp.sum(s * t, axis=-1))


def _mask(mask: jax.Array | None, shape: Sequence[int]) -> jax.Array:
    if mask is None:
        return jnp.ones(shape[:2], jnp.float32)
    return mask.astype(jnp.float32)


def hidden_distillation(student: Sequence[jax.Array], teacher: Sequence[jax.Array],
                        mask: jax.Array | None = None) -> jax.Array:
    """Mean over layers of mean_{real tokens, channels} (s − t)²; lists of (B, T, d) -> ()."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hidden_distillation needs as many student as teacher layers (>= 1); "
                         f"got {len(student)} and {len(teacher)}.")
    m = _mask(mask, student[0].shape)
    count = jnp.maximum(jnp.sum(m), 1.0) * student[0].shape[-1]
    per_layer = [jnp.sum(jnp.square(s - t) * m[..., None]) / count
                 for s, t in zip(student, teacher)]
    return jnp.mean(jnp.stack(per_layer))


def logits_distillation(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None,
                        temperature: float = 1.0) -> jax.Array:
    """τ² · mean over real tokens of KL(p_teacher ‖ p_student) at temperature τ;
    student, teacher (B, T, V) -> ()."""
    log_s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    m = _mask(mask, student.shape)
    return temperature ** 2 * jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def max_abs_penalty(activations: Sequence[jax.Array], mask: jax.Array | None = None
                    ) -> jax.Array:
    """Σ_sites mean_b max_{real t, c} |x_btc|; activations: list of (B, T, d) -> ()."""
    total = jnp.zeros((), jnp.float32)
    for x in activations:
        m = _mask(mask, x.shape)[..., None] > 0
        total = total + jnp.mean(jnp.max(jnp.where(m, jnp.abs(x), 0.0), axis=(1, 2)))
    return total


def kurtosis_penalty(activations: Sequence[jax.Array], mask: jax.Array | None = None
                     ) -> jax.Array:
    """Σ_sites mean_b kurtosis of sample b's real activations; list of (B, T, d) -> ()."""
    total = jnp.zeros((), jnp.float32)
    for x in activations:
        where = jnp.broadcast_to(_mask(mask, x.shape)[..., None] > 0, x.shape)
        total = total + jnp.mean(kurtosis_per_sample(x, where))
    return total


def _layer_index(path: str) -> int:
    m = re.search(r"layers_(\d+)", path)
    return int(m.group(1)) if m else -1


def forward(model: Any, params: Any, batch: Mapping[str, jax.Array]
            ) -> tuple[jax.Array, dict[str, list[jax.Array]]]:
    """One deterministic forward pass: (model output, activations).

    output: (B, d) pooled embedding of a sentence encoder, or (B, T, V) logits of a model with
    a head. activations: {'residual': every attention / MLP residual sum (B, T, d), in layer
    order, attention first; 'block_output': every block's output (B, T, d), in layer order}.
    """
    def wanted(module: Any, method_name: str) -> bool:
        return method_name == "__call__" and module.name in RESIDUAL_SITES

    out, cols = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                            batch["token_type_ids"], deterministic=True,
                            capture_intermediates=wanted, mutable=["intermediates"])
    from flax.traverse_util import flatten_dict
    flat = {"/".join(k): v for k, v in flatten_dict(cols["intermediates"]).items()}
    residual, blocks = [], []
    for path in sorted(flat, key=lambda p: (_layer_index(p), p)):
        value = flat[path][0] if isinstance(flat[path], tuple) else flat[path]
        if path.endswith("/block_output"):
            blocks.append(value)
        elif any(path.endswith(f"/{s}/__call__") for s in RESIDUAL_SITES):
            residual.append(value)
    return out, {"residual": residual, "block_output": blocks}


def penalty_activations(acts: Mapping[str, list[jax.Array]], sites: str) -> list[jax.Array]:
    """The activations a penalty acts on: 'residual' | 'block_output' | 'both'."""
    if sites not in PENALTY_SITES:
        raise ValueError(f"retrofit.penalty_sites={sites!r} is unknown; choose one of "
                         f"{PENALTY_SITES}.")
    if sites == "both":
        return list(acts["residual"]) + list(acts["block_output"])
    return list(acts[sites])
