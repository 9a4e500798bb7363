"""The jitted train step (with in-step gradient accumulation) and eval step."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from qtransformers.models.tasks import SUM_KEYS, get_task
from qtransformers.train.state import TrainState

Batch = Mapping[str, jax.Array]


def _split_micro_batches(batch: Batch, accum: int, mesh: jax.sharding.Mesh | None,
                         rules: Sequence) -> dict[str, jax.Array]:
    """(B, ...) -> (accum, B / accum, ...), micro-batch k = rows k, k + accum, ...

    Interleaved rows keep every micro-batch spread evenly over the data-parallel devices (each
    device holds contiguous rows), so no resharding is needed.
    """
    out = {}
    for name, x in batch.items():
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            axes = nn.logical_to_mesh_axes(("act_batch",), tuple(tuple(r) for r in rules))[0]
            spec = P(None, axes, *([None] * (x.ndim - 2)))
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        out[name] = x
    return out


def make_train_step(model: nn.Module, family: str, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1,
                    mesh: jax.sharding.Mesh | None = None, rules: Sequence = (),
                    mlm_max_predictions: int = 0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, batch) -> (state, metrics)`: one optimizer update.

    The loss is the objective's sum over all weighted positions of the global batch divided by
    their total weight, so `grad_accum_steps` micro-batches (a scan inside the step) give the
    same update as one big batch. Dropout uses fold_in(state.rng, state.step) (and the
    micro-batch index), so a resumed run draws the same masks.

    Args:
      batch: {name: (B, ...)} global arrays (B = global batch size).
      mesh, rules: constrain micro-batches to the data-parallel axes (None: no constraint).
      mlm_max_predictions: masked LM only: the MLM head runs on at most this many masked
        positions per row (objectives.select_predictions); 0 = on all T positions.
    Returns metrics: loss, accuracy (over weighted positions), weight_sum, grad_norm,
      learning_rate (of this update) - scalars.
    """
    task = get_task(family)

    def loss_fn(params: Any, micro: Batch, rng: jax.Array):
        micro = task.prepare_train_batch(micro, mlm_max_predictions)
        logits = task.apply(model, {"params": params}, micro, deterministic=False,
                            rngs={"dropout": rng})
        sums = task.metric_sums(logits, micro)
        return sums["loss_sum"], sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum_steps == 1:
            (_, sums), grads = grad_fn(state.params, batch, rng)
        else:
            micro_batches = _split_micro_batches(batch, grad_accum_steps, mesh, rules)

            def accumulate(carry, xs):
                grads_acc, sums_acc = carry
                index, micro = xs
                (_, sums), grads = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
                return (jax.tree.map(jnp.add, grads_acc, grads),
                        jax.tree.map(jnp.add, sums_acc, sums)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_sums = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
            (grads, sums), _ = jax.lax.scan(
                accumulate, (zeros, zero_sums), (jnp.arange(grad_accum_steps), micro_batches))
        weight = jnp.maximum(sums["weight_sum"], 1e-12)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": sums["loss_sum"] / weight, "accuracy": sums["correct_sum"] / weight,
                   "weight_sum": sums["weight_sum"], "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, family: str) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """`eval_step(params, batch) -> {'loss_sum', 'correct_sum', 'weight_sum'}` (no dropout)."""
    task = get_task(family)

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        return task.metric_sums(task.apply(model, {"params": params}, batch), batch)
    return eval_step
