""""Will it fit": parameter, optimizer-state, gradient and activation bytes per device, and the
FLOPs of one training step, from a ModelConfig and a mesh — before anything is launched.

Counts are analytic (no tracing), so a plan for OPT-1.3B on a v5e-64 prints in milliseconds.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from qtransformers.models.config import ModelConfig
from qtransformers.ops.gates import gate_param_count

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Peak dense bf16 FLOP/s per device (for MFU); keys are substrings of jax's device_kind.
DEVICE_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12,
    "H200": 989e12, "A100": 312e12,
}
DEVICE_MEMORY_BYTES = {
    "v4": 32e9, "v5litepod": 16e9, "v5e": 16e9, "v5p": 95e9, "v6e": 32e9,
    "h100": 80e9, "h200": 141e9, "a100": 80e9,
}


def layer_param_count(cfg: ModelConfig) -> int:
    """Parameters of one TransformerBlock: attention (+ gate), MLP, two LayerNorms."""
    d, d_ff = cfg.d_model, cfg.d_ff
    attention = 4 * (d * d + d) + gate_param_count(cfg.gate, d, cfg.num_heads, cfg.gate_hidden)
    return attention + (d * d_ff + d_ff) + (d_ff * d + d) + 2 * 2 * d


def embedding_param_count(cfg: ModelConfig) -> int:
    """Parameters outside the blocks: embeddings, heads, final LayerNorms."""
    d = cfg.d_model
    if cfg.family == "bert":
        head = d * d + d + 2 * d + cfg.vocab_size
        return (cfg.vocab_size + cfg.max_len + cfg.type_vocab_size) * d + 2 * d + head
    if cfg.family == "opt":
        embed_dim = cfg.word_embed_proj_dim or d
        projections = 2 * embed_dim * d if embed_dim != d else 0
        return (cfg.vocab_size * embed_dim + (cfg.max_len + 2) * d + projections
                + (2 * d if cfg.final_ln else 0))
    patch = cfg.patch_size ** 2 * cfg.num_channels * d + d
    return (patch + (2 * d if cfg.patch_ln else 0) + d + (cfg.num_patches + 1) * d + 2 * d
            + d * cfg.num_classes + cfg.num_classes)


def count_params(cfg: ModelConfig) -> int:
    """Total parameters of the model `build_model(cfg)` builds (equals its init)."""
    return embedding_param_count(cfg) + cfg.num_layers * layer_param_count(cfg)


def sequence_length(cfg: ModelConfig, seq_len: int | None) -> int:
    return cfg.num_patches + 1 if cfg.family == "vit" else int(seq_len or cfg.max_len)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 x matmul params + attention's 12 x L x T x d (fwd + bwd)."""
    t = sequence_length(cfg, seq_len)
    matmul = cfg.num_layers * (layer_param_count(cfg) - 4 * cfg.d_model)
    if cfg.family in ("bert", "opt"):
        matmul += cfg.vocab_size * (cfg.word_embed_proj_dim or cfg.d_model)  # tied output head
    return 6.0 * matmul + 12.0 * cfg.num_layers * t * cfg.d_model


def activation_elements_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Elements autodiff keeps per token for the backward pass (no remat).

    Per layer: LayerNorm in/out (4d), Q/K/V (3d), scores and probabilities (2 H T; blocked or
    fused attention: the output, R and two row statistics, 2d + 2H, instead), context and
    attention output (2d), residuals (2d), FFN pre- and post-activation (2 d_ff), FFN output (d),
    plus dropout masks where dropout is on. Output head: logits, softmax, gradient (3 V).
    """
    d, h = cfg.d_model, cfg.num_heads
    per_layer = 12 * d + 2 * cfg.d_ff
    if cfg.attention_impl == "materialized":
        per_layer += 2 * h * seq_len
        if cfg.attention_dropout_rate > 0:
            per_layer += h * seq_len
    else:  # blocked / fused keep the output, its row statistics and (clipped) R instead
        per_layer += 2 * d + 2 * h
    if cfg.dropout_rate > 0:
        per_layer += 2 * d
    if cfg.remat:
        per_layer = d  # only each block's input survives
    # logits, their softmax and the logits gradient are alive together at the peak.
    head = 3 * cfg.vocab_size if cfg.family in ("bert", "opt") else 0
    return cfg.num_layers * per_layer + head + 4 * d


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
    """Fills one -1 axis so the mesh uses all devices; ValueError when it cannot divide them."""
    shape = {k: int(v) for k, v in mesh_shape.items()}
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1.")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {shape} does not divide {num_devices} devices: the fixed axes "
                             f"multiply to {fixed}.")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh {shape} has {math.prod(shape.values())} devices but "
                         f"{num_devices} are available; make the axes multiply to {num_devices}.")
    return shape


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
    t = sequence_length(cfg, seq_len)
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


def peak_flops_for(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of a jax device_kind string, or None when unknown (e.g. CPU)."""
    for key, value in DEVICE_PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None
