"""Hardware facts and the arithmetic over them, in one place for the trainer, the planner and
the launchers: peak FLOP/s and memory per device, training FLOPs per token, and the mesh rule
(one axis may be -1: the remaining devices). Pure Python: no JAX import."""
from __future__ import annotations

import math
from typing import Mapping

# Dense bf16 peak FLOP/s per chip, matched by substring of `device.device_kind` (first match,
# so the more specific names come first).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6", 918e12),  # v6e (Trillium); reports "TPU v6 lite"
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),  # v5e reports "TPU v5 lite"
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; PCIe parts are ~25% lower
    ("A100", 312e12),
)
# Memory per device (bytes), by accelerator generation as the launchers name it.
DEVICE_MEMORY_BYTES = {
    "v4": 32e9, "v5litepod": 16e9, "v5e": 16e9, "v5p": 95e9, "v6e": 32e9,
    "h100": 80e9, "h200": 141e9, "a100": 80e9,
}


def peak_flops_per_device(device_kind: str, platform: str = "",
                          compute_dtype: str = "bfloat16") -> float | None:
    """Peak FLOP/s of one device (a jax `device_kind`), or None when it is not in the table.

    float32 on NVIDIA GPUs runs matmuls as TF32 (half the bf16 rate); TPUs run float32
    matmuls in bf16 passes at default precision, so the bf16 peak applies.
    """
    for pattern, peak in PEAK_BF16_FLOPS:
        if pattern.lower() in device_kind.lower():
            if compute_dtype == "float32" and platform == "gpu":
                return peak / 2
            return peak
    return None


def train_flops_per_token(matmul_params: int, num_layers: int, d_model: int,
                          seq_len: int) -> float:
    """Training FLOPs per token ≈ 6 N (forward + backward over the matmul parameters N) +
    12 L T d (attention scores and context, forward + backward): the PaLM appendix B estimate."""
    return 6.0 * matmul_params + 12.0 * num_layers * seq_len * d_model


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
    """Achieved / peak FLOP/s as a fraction, or None without a known peak."""
    if peak_per_device is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak_per_device * num_devices)


def fill_mesh_axes(shape: Mapping[str, int], num_devices: int, label: str = "mesh",
                   where: str = "") -> dict[str, int]:
    """The mesh axis sizes with the one -1 axis (if any) filled so they use every device.

    Args:
      shape: axis name -> size (>= 1, or -1 for "the remaining devices", at most one).
      num_devices: devices the mesh must cover.
      label: how errors name the shape ("mesh", "mesh.shape", ...).
      where: what the devices are, for errors (e.g. "v4-16").
    Returns:
      {axis: size} in the order given, multiplying to num_devices.
    Raises ValueError naming the axes, their product and the device count when they cannot.
    """
    where = f" ({where})" if where else ""
    text = "{" + ", ".join(f"{k}: {v}" for k, v in shape.items()) + "}"
    sizes = {k: int(v) for k, v in shape.items()}
    bad = [k for k, v in sizes.items() if v == 0 or v < -1]
    fill = [k for k, v in sizes.items() if v == -1]
    if bad or len(fill) > 1:
        raise ValueError(f"{label} {text}: axis sizes must be positive, with at most one -1 "
                         f"(the remaining devices); bad axes: {bad or fill}.")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"{label} {text} does not fit {num_devices} devices{where}: the "
                             f"fixed axes multiply to {known}, which does not divide "
                             f"{num_devices}.")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"{label} {text} multiplies to {known} but there are {num_devices} "
                         f"devices{where}: make the axes multiply to {num_devices} or set one "
                         "axis to -1.")
    return sizes
