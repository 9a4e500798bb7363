"""Device mesh, multi-host start-up and logical-axis sharding of the train state and batches."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.linen import spmd
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from qtransformers.hardware import fill_mesh_axes

MESH_AXES = ("data", "fsdp", "tensor")


class DistributedInitError(RuntimeError):
    """The multi-process runtime could not start (e.g. an unreachable coordinator)."""


def resolve_mesh_shape(shape: Mapping[str, int], device_count: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes from config.mesh.shape; one -1 takes "the rest".

    Raises ValueError when the axes are unknown or their product is not `device_count`.
    """
    if set(shape) != set(MESH_AXES):
        raise ValueError(f"mesh.shape has axes {sorted(shape)}; it needs exactly {MESH_AXES}, "
                         "e.g. {'data': -1, 'fsdp': 1, 'tensor': 1}.")
    sizes = fill_mesh_axes({a: shape[a] for a in MESH_AXES}, device_count, "mesh.shape",
                           "jax.device_count()")
    return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (GSPMD-style propagation)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split: data * fsdp."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def _cluster_detected() -> bool:
    """True when the environment describes a multi-process TPU pod, SLURM or Open MPI job."""
    env = os.environ
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(var, "1").isdigit() and int(env.get(var, "1")) > 1:
            return True
    return False


def _wait_for_coordinator(dist: Any) -> None:
    """Waits until the coordinator's port accepts connections; raises a clear error after
    distributed.initialization_timeout (jax itself aborts the process on that timeout)."""
    address = str(dist.coordinator_address or "")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"distributed.coordinator_address={address!r} must be 'host:port', "
                         "e.g. '10.0.0.1:1234' (the address of process 0).")
    deadline = time.monotonic() + float(dist.initialization_timeout)
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise DistributedInitError(
                    f"the coordinator distributed.coordinator_address={address!r} was not "
                    f"reachable within distributed.initialization_timeout="
                    f"{dist.initialization_timeout}s ({err}). Start process 0 first (it hosts "
                    "the coordinator), check the address and firewall, or raise the timeout."
                    ) from None
            time.sleep(0.5)


def maybe_initialize_distributed(dist: Any) -> bool:
    """`jax.distributed.initialize` when config.distributed asks for several processes or a
    cluster is auto-detected (TPU pod, SLURM, Open MPI). Call before any other JAX work.

    Returns True when the distributed runtime was started.
    """
    explicit = dist.num_processes is not None and int(dist.num_processes) > 1
    if not explicit and not _cluster_detected():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": int(dist.initialization_timeout)}
    if explicit:
        kwargs.update(coordinator_address=dist.coordinator_address,
                      num_processes=int(dist.num_processes), process_id=int(dist.process_id))
    if explicit and int(dist.process_id) != 0:
        _wait_for_coordinator(dist)
    logging.info("jax.distributed.initialize(%s)", kwargs)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # the runtime raises several types on an unreachable coordinator
        raise DistributedInitError(
            f"jax.distributed.initialize failed ({type(err).__name__}: {err}). Check that "
            f"distributed.coordinator_address={dist.coordinator_address!r} is reachable from "
            f"every process, that all {dist.num_processes} processes were started, and raise "
            f"distributed.initialization_timeout={dist.initialization_timeout} if start-up is "
            "slow.") from err
    return True


def _axis_name(name: Any) -> Any:
    # nn/layers.py names its MLP axis with a constant that the MLP class shadows; the class's
    # lower-cased name is the intended logical name ('mlp').
    return name.__name__.lower() if isinstance(name, type) else name


def _dedupe(names: list[Any]) -> list[Any]:
    # A square kernel named (embed, embed) (BERT's MLM transform) cannot shard one mesh axis
    # twice: only the first occurrence keeps its name.
    seen: set[Any] = set()
    out = []
    for name in names:
        out.append(None if name is not None and name in seen else name)
        seen.add(name)
    return out


def logical_specs(boxed_tree: Any) -> Any:
    """PartitionSpecs of logical axis names for a tree of boxed (nn.Partitioned) leaves."""
    specs = nn.get_partition_spec(boxed_tree)
    return jax.tree.map(lambda spec: P(*_dedupe([_axis_name(n) for n in spec])), specs,
                        is_leaf=lambda x: isinstance(x, P))


def logical_to_shardings(specs: Any, mesh: jax.sharding.Mesh, rules: Sequence) -> Any:
    """NamedShardings on `mesh` for a tree of logical PartitionSpecs under `rules`."""
    return nn.logical_to_mesh_sharding(specs, mesh, tuple(tuple(r) for r in rules))


def check_divisible(abstract: Any, shardings: Any) -> None:
    """Raises ValueError naming the first array whose dims are not divisible by its mesh axes."""
    def check(path: Any, leaf: Any, sharding: NamedSharding) -> None:
        for dim, axes in zip(leaf.shape, sharding.spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            ways = int(np.prod([sharding.mesh.shape[a] for a in axes]))
            if ways > 1 and dim % ways:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be "
                    f"split {ways} ways over mesh axes {axes}: change mesh.shape (e.g. a smaller "
                    f"'{axes[-1]}' axis), pad the model dimension (e.g. model.vocab_size to a "
                    f"multiple of {ways}), or edit mesh.logical_axis_rules.")
    jax.tree_util.tree_map_with_path(check, abstract, shardings)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Sequence, ndim: int) -> NamedSharding:
    """Sharding of a (B, ...) batch array: B over the mesh axes of 'act_batch'."""
    batch_axes = nn.logical_to_mesh_axes(("act_batch",), tuple(tuple(r) for r in rules))[0]
    return NamedSharding(mesh, P(batch_axes, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def _no_param_constraints() -> Iterator[None]:
    # flax's DenseGeneral initialises multi-dim kernels flat and unboxes them with their 3-axis
    # logical constraint, which fails under a mesh (rank 2 vs 3). `apply` re-runs that init in
    # eval_shape to check shapes, so inside a mesh context we skip parameter constraints: the
    # jit in_shardings already place the parameters. Activation constraints are unaffected.
    original = spmd.LogicallyPartitioned.unbox
    spmd.LogicallyPartitioned.unbox = lambda self, apply_constraint=True: original(self, False)
    try:
        yield
    finally:
        spmd.LogicallyPartitioned.unbox = original


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: Sequence) -> Iterator[None]:
    """Mesh + logical axis rules active, so activation constraints in the models take effect.

    Trace (jit / lower) the train and eval steps inside this context.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(tuple(r) for r in rules)), \
            _no_param_constraints():
        yield


def global_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, rules: Sequence,
                 global_batch_size: int) -> dict[str, jax.Array]:
    """Global jax.Arrays from this process's rows of a batch (multi-host safe).

    Args:
      batch: {name: (B_local, ...) numpy array}, B_local = global_batch_size / process_count.
    Returns:
      {name: (global_batch_size, ...) jax.Array} sharded over the batch axes.
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, rules, value.ndim)
        out[name] = jax.make_array_from_process_local_data(
            sharding, value, (global_batch_size,) + value.shape[1:])
    return out
