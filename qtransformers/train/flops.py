"""The trainer's view of FLOPs and MFU. The facts live in one place each: the peak FLOP/s table
and the FLOPs-per-token formula in `qtransformers.hardware`, a model's matmul parameters and
sequence length in `qtransformers.models.counts` (the planner uses the same)."""
from __future__ import annotations

from qtransformers.hardware import (PEAK_BF16_FLOPS, mfu, peak_flops_per_device,
                                    train_flops_per_token)
from qtransformers.models.counts import flops_per_token

__all__ = ["PEAK_BF16_FLOPS", "flops_per_token", "mfu", "peak_flops_per_device",
           "train_flops_per_token"]
