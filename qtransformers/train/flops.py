"""Training FLOPs per token and device peak FLOP/s, for model FLOPs utilisation (MFU)."""
from __future__ import annotations

# Dense bf16 peak FLOP/s per chip, matched by substring of `device.device_kind` (first match).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6", 918e12),  # v6e (Trillium)
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),  # v5e reports "TPU v5 lite"
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; PCIe parts are ~25% lower
    ("A100", 312e12),
)


def peak_flops_per_device(device_kind: str, platform: str = "",
                          compute_dtype: str = "bfloat16") -> float | None:
    """Peak FLOP/s of one device, or None when its kind is not in the table.

    float32 on NVIDIA GPUs runs matmuls as TF32 (half the bf16 rate); TPUs run float32
    matmuls in bf16 passes at default precision, so the bf16 peak applies.
    """
    for pattern, peak in PEAK_BF16_FLOPS:
        if pattern.lower() in device_kind.lower():
            if compute_dtype == "float32" and platform == "gpu":
                return peak / 2
            return peak
    return None


def train_flops_per_token(num_params: int, num_layers: int, d_model: int, seq_len: int) -> float:
    """≈ 6 N (forward + backward matmuls over all parameters) + 12 L T d (attention scores and
    context, forward + backward), the PaLM appendix B estimate."""
    return 6.0 * num_params + 12.0 * num_layers * seq_len * d_model


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
    """Achieved / peak FLOP/s as a fraction, or None without a known peak."""
    if peak_per_device is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak_per_device * num_devices)
