"""The retrofit optimizer: AdamW with one learning rate / weight decay for the parameters the
retrofit adds (the gates) and another for the pretrained ones, or frozen groups.

Labels per parameter ('/'-joined path): 'new' (source.is_new_param), 'old', or 'frozen'
(retrofit.trainable: 'attention' trains only the attention sublayers (.../attention/...) and the
gates; 'new' only the gates). Weight decay never touches biases and LayerNorm parameters unless
optim.decay_ln_scale (train.optimizer.decay_mask, the project's rule). Both groups share the
warmup + decay schedule shape (train.optimizer.make_schedule), each at its own peak lr.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from qtransformers.quant.params import path_to_str
from qtransformers.retrofit.source import is_new_param
from qtransformers.train.optimizer import decay_mask, make_schedule


def param_labels(params: Any, trainable: str = "all") -> Any:
    """'new' | 'old' | 'frozen' per parameter (see module docstring)."""
    def label(path: tuple[Any, ...], _: Any) -> str:
        name = path_to_str(path)
        if is_new_param(name):
            return "new"
        if trainable == "new" or (trainable == "attention" and "/attention/" not in f"/{name}/"):
            return "frozen"
        return "old"
    return jax.tree_util.tree_map_with_path(label, params)


def make_retrofit_optimizer(optim: Any, trainable: str, num_steps: int
                            ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """(transformation, {'old': schedule, 'new': schedule}) for config.optim."""
    schedules = {}
    transforms = {"frozen": optax.set_to_zero()}
    for group, lr, wd in (("old", optim.lr, optim.weight_decay),
                          ("new", optim.new_lr or optim.lr, optim.new_weight_decay)):
        section = ml_collections.ConfigDict(dict(lr=float(lr), warmup_steps=optim.warmup_steps,
                                                 schedule=optim.schedule,
                                                 min_lr_ratio=optim.min_lr_ratio))
        schedules[group] = make_schedule(section, max(num_steps, 1))
        mask = lambda p: decay_mask(p, bool(optim.decay_ln_scale))  # noqa: E731
        transforms[group] = optax.adamw(schedules[group], b1=optim.b1, b2=optim.b2,
                                        eps=optim.eps, weight_decay=float(wd), mask=mask)
    tx = optax.multi_transform(transforms, lambda p: param_labels(p, trainable))
    if optim.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(optim.clip_norm)), tx)
    return tx, schedules
