"""The train state, its initialisation and its shardings (from `jax.eval_shape` of the init)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtransformers.models.config import ModelConfig
from qtransformers.train import mesh as mesh_lib
from qtransformers.models.tasks import get_task


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint restores.

    step: () int32, optimizer updates done. params: the model parameters (float32).
    opt_state: the optax state. rng: (2,) uint32 base key; step s uses fold_in(rng, s).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def example_batch(model_cfg: ModelConfig, seq_len: int, batch_size: int = 1) -> dict[str, Any]:
    """A zero batch of the model's input shapes, for init and eval_shape (Task.example_batch)."""
    return get_task(model_cfg).example_batch(model_cfg, seq_len, batch_size)


def make_init_fn(model: nn.Module, model_cfg: ModelConfig, tx: optax.GradientTransformation,
                 seq_len: int, boxed: bool = False) -> Callable[[jax.Array], TrainState]:
    """`init(seed_key) -> TrainState` at step 0; with boxed=True the params keep their
    nn.Partitioned boxes (for reading logical axis names from `jax.eval_shape`)."""
    def init(key: jax.Array) -> TrainState:
        params_key, dropout_key = jax.random.split(key)
        args, kwargs = get_task(model_cfg).model_inputs(example_batch(model_cfg, seq_len))
        params = model.init({"params": params_key}, *args, deterministic=True, **kwargs)["params"]
        if not boxed:
            params = nn.unbox(params)
        opt_state = tx.init(nn.unbox(params))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                          rng=dropout_key)
    return init


def state_shardings(model: nn.Module, model_cfg: ModelConfig, tx: optax.GradientTransformation,
                    seq_len: int, mesh: jax.sharding.Mesh,
                    rules: Sequence) -> tuple[TrainState, TrainState]:
    """(abstract state, shardings): shapes from eval_shape of the init, shardings from the
    params' logical axis names under `rules` on `mesh`; optimizer moments follow their params,
    other optimizer leaves (counts) are replicated.

    Raises ValueError when a parameter dimension is not divisible by its mesh axes.
    """
    key = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(make_init_fn(model, model_cfg, tx, seq_len, boxed=True), key)
    param_shardings = mesh_lib.logical_to_shardings(mesh_lib.logical_specs(boxed.params), mesh,
                                                    rules)
    abstract = jax.eval_shape(make_init_fn(model, model_cfg, tx, seq_len), key)
    mesh_lib.check_divisible(abstract.params, param_shardings)
    replicated = mesh_lib.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract.opt_state, param_shardings,
        transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                           rng=replicated)
    return abstract, shardings


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings (an orbax restore target on the current mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def count_params(params: Any) -> int:
    """Number of parameters in a (possibly abstract) parameter tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """() bool: every float leaf of `tree` is finite (no overflow-prone norm)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
