""""Will it fit": parameter, optimizer-state, gradient and activation bytes per device, and the
FLOPs of one training step, from a ModelConfig and a mesh — before anything is launched.

Counts are analytic (no tracing), so a plan for OPT-1.3B on a v5e-64 prints in milliseconds.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from qtransformers.hardware import (DEVICE_MEMORY_BYTES, PEAK_BF16_FLOPS, fill_mesh_axes,
                                    peak_flops_per_device)
from qtransformers.models.config import ModelConfig
from qtransformers.models.counts import (activation_elements_per_token, count_params,
                                         embedding_param_count, flops_per_token,
                                         layer_param_count)

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
__all__ = ["BYTES", "DEVICE_MEMORY_BYTES", "PEAK_BF16_FLOPS", "Plan",
           "activation_elements_per_token", "check_fits", "count_params", "embedding_param_count", "flops_per_token",
           "layer_param_count", "peak_flops_per_device", "plan_training", "resolve_mesh"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory (bytes) and per-step compute of a training configuration."""

    num_params: int
    num_devices: int
    per_device_batch: int
    seq_len: int
    param_bytes: float
    optimizer_bytes: float
    gradient_bytes: float
    activation_bytes: float
    flops_per_step: float

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.optimizer_bytes + self.gradient_bytes + self.activation_bytes

    def step_seconds(self, peak_flops_per_device: float, mfu: float = 0.5) -> float:
        """Expected step time at a given model-FLOPs utilisation."""
        return self.flops_per_step / (self.num_devices * peak_flops_per_device * mfu)

    def table(self) -> str:
        gib = 1024 ** 3
        rows = [("parameters", f"{self.num_params / 1e6:.1f} M"),
                ("devices", str(self.num_devices)),
                ("batch per device x seq", f"{self.per_device_batch} x {self.seq_len}"),
                ("params / device", f"{self.param_bytes / gib:.3f} GiB"),
                ("optimizer state / device", f"{self.optimizer_bytes / gib:.3f} GiB"),
                ("gradients / device", f"{self.gradient_bytes / gib:.3f} GiB"),
                ("activations / device", f"{self.activation_bytes / gib:.3f} GiB"),
                ("total / device", f"{self.total_bytes / gib:.3f} GiB"),
                ("FLOPs / step", f"{self.flops_per_step:.3e}")]
        return "\n".join(f"{name:<26}{value}" for name, value in rows)


def resolve_mesh(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills one -1 axis so the mesh uses all devices (`hardware.fill_mesh_axes`)."""
    return fill_mesh_axes(mesh_shape, num_devices)


def plan_training(cfg: ModelConfig, *, global_batch_size: int, num_devices: int,
                  mesh_shape: Mapping[str, int] | None = None, seq_len: int | None = None,
                  grad_accum_steps: int = 1, param_dtype: str = "float32",
                  optimizer_slots: int = 2) -> Plan:
    """Memory per device and FLOPs per step of AdamW training.

    Args:
      cfg: the model.
      global_batch_size: sequences (images) per optimizer step over all devices.
      num_devices: devices in the mesh.
      mesh_shape: {'data', 'fsdp', 'tensor'} sizes (one may be -1); default all data-parallel.
      seq_len: tokens per sequence (default cfg.max_len; ViT: patches + 1).
      grad_accum_steps: micro-batches per step (activations scale with one micro-batch).
      optimizer_slots: float32 slots per parameter (2 for Adam's moments).
    """
    mesh = resolve_mesh(mesh_shape or {"data": -1}, num_devices)
    data_parallel = mesh.get("data", 1) * mesh.get("fsdp", 1)
    model_shards = mesh.get("fsdp", 1) * mesh.get("tensor", 1)
    if global_batch_size % (data_parallel * grad_accum_steps):
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by data "
                         f"parallelism {data_parallel} x grad_accum_steps {grad_accum_steps}.")
    t = cfg.sequence_length(seq_len)
    n = count_params(cfg)
    micro_batch = global_batch_size // data_parallel // grad_accum_steps
    act_bytes = BYTES[cfg.dtype]
    activations = (micro_batch * t * activation_elements_per_token(cfg, t) * act_bytes
                   / mesh.get("tensor", 1))
    return Plan(
        num_params=n, num_devices=num_devices, per_device_batch=micro_batch, seq_len=t,
        param_bytes=n * BYTES[param_dtype] / model_shards,
        optimizer_bytes=optimizer_slots * n * 4 / model_shards,
        gradient_bytes=n * 4 / model_shards, activation_bytes=activations,
        flops_per_step=flops_per_token(cfg, t) * global_batch_size * t)


def check_fits(plan: Plan, device_memory_bytes: float, headroom: float = 0.9) -> None:
    """Raises ValueError when the plan needs more than `headroom` of a device's memory."""
    if plan.total_bytes > headroom * device_memory_bytes:
        raise ValueError(
            f"the plan needs {plan.total_bytes / 1024**3:.2f} GiB per device but a device has "
            f"{device_memory_bytes / 1024**3:.1f} GiB ({headroom:.0%} usable): shard more "
            "(mesh fsdp / tensor), lower the per-device batch, use grad_accum_steps, "
            "bfloat16 activations (train.compute_dtype) or remat (model.remat=True).")
