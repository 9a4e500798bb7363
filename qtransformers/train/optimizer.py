"""AdamW with the reference's weight-decay masks, warmup + decay schedules and clipping."""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Sequence

import jax
import optax

from qtransformers.pytree import path_to_str

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw",)


def is_bias(names: Sequence[str]) -> bool:
    """A bias-like parameter: its leaf name is 'bias' or ends with '_bias' (gate biases)."""
    return bool(names) and (names[-1] == "bias" or names[-1].endswith("_bias"))


def is_layernorm_scale(names: Sequence[str]) -> bool:
    """A LayerNorm scale: in Flax only normalisation layers name a parameter 'scale'."""
    return bool(names) and names[-1] == "scale"


def decay_mask(params: Any, decay_ln_scale: bool = False,
               no_decay: Sequence[str] = ()) -> Any:
    """Which parameters get weight decay (True) as in the reference recipes.

    Biases and LayerNorm parameters are excluded (HuggingFace: no_decay = ["bias",
    "LayerNorm.weight"]); `decay_ln_scale` decays LayerNorm scales too (the OPT recipe for
    clipped softmax / gated attention, paper.md §6); `no_decay` adds fnmatch patterns on the
    '/'-joined path (e.g. '*cls_token' for ViT).

    Args:
      params: the parameter pytree (arrays or ShapeDtypeStructs).
    Returns:
      a pytree of bools with the structure of `params`.
    """
    def decide(path: tuple[Any, ...], _: Any) -> bool:
        names = path_to_str(path).split("/")
        joined = "/".join(names)
        if any(fnmatch.fnmatchcase(joined, pattern) for pattern in no_decay):
            return False
        if is_bias(names):
            return False
        if is_layernorm_scale(names):
            return decay_ln_scale
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def make_schedule(optim: Any, num_steps: int) -> optax.Schedule:
    """Learning rate by step: linear warmup from 0 to `optim.lr`, then linear / cosine decay to
    `optim.min_lr_ratio * lr` at `num_steps`, or constant.

    Args:
      optim: the config.optim section (lr, warmup_steps, schedule, min_lr_ratio).
      num_steps: total optimizer updates.
    """
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    end = lr * float(optim.min_lr_ratio)
    decay_steps = max(num_steps - warmup, 1)
    if optim.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim.min_lr_ratio))
    elif optim.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r} is unknown; choose one of "
                         f"{SCHEDULES}.")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(optim: Any, num_steps: int) -> tuple[optax.GradientTransformation,
                                                         optax.Schedule]:
    """The optimizer described by config.optim: global-norm clipping (clip_norm > 0) then AdamW
    with the decay mask of `decay_mask`. Gradient accumulation is done in the train step, so one
    `update` is one optimizer step.

    Returns:
      (transformation, schedule).
    """
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim.name!r} is unknown; choose one of {OPTIMIZERS}.")
    schedule = make_schedule(optim, num_steps)
    mask: Callable[[Any], Any] = lambda params: decay_mask(  # noqa: E731
        params, bool(optim.decay_ln_scale), tuple(optim.no_decay))
    adamw = optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                        weight_decay=float(optim.weight_decay), mask=mask)
    if float(optim.clip_norm) > 0:
        return optax.chain(optax.clip_by_global_norm(float(optim.clip_norm)), adamw), schedule
    return adamw, schedule
