"""Metric writers (tensorboardX + JSONL, process 0 only) and the console progress line."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan / inf
    return value


class MetricWriter:
    """Writes scalars to tensorboardX (workdir/tensorboard) and one JSON line per record to
    workdir/metrics.jsonl: {"step": s, "split": "train" | "eval" | "outliers", ...}.

    Does nothing unless `enabled` (process 0).
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # optional: the JSONL file has everything
            logger.warning("tensorboardX is not installed; writing metrics.jsonl only.")

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` (scalars or nested dicts of scalars) at `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **_jsonable(metrics)}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in _flatten(metrics).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        """Flushes and closes both files."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value.item() if hasattr(value, "item") else value
    return out


def read_metrics(workdir: str, split: str = "train") -> dict[int, dict[str, Any]]:
    """{step: record} from workdir/metrics.jsonl; a step logged twice (a resumed run) keeps its
    last record."""
    out: dict[int, dict[str, Any]] = {}
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if record.get("split") == split:
                    out[int(record["step"])] = record
    return out


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Throughput:
    """Items/s, MFU and ETA between successive `update` calls; time spent evaluating or saving
    is discounted."""

    def __init__(self, items_per_step: int, flops_per_step: float, num_devices: int,
                 peak_per_device: float | None, total_steps: int, unit: str = "tokens"):
        self.items_per_step, self.flops_per_step = items_per_step, flops_per_step
        self.num_devices, self.peak, self.total_steps, self.unit = (
            num_devices, peak_per_device, total_steps, unit)
        self._last: tuple[int, float] | None = None

    def update(self, step: int) -> dict[str, float]:
        """Rates since the previous call; empty on the first call."""
        now = time.perf_counter()
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0]:
            return {}
        step_time = (now - last[1]) / (step - last[0])
        out = {"step_time": step_time, f"{self.unit}_per_sec": self.items_per_step / step_time,
               "eta_sec": step_time * (self.total_steps - step)}
        if self.peak is not None:
            out["mfu"] = self.flops_per_step / step_time / (self.peak * self.num_devices)
        return out

    def reset(self) -> None:
        """Forgets the last time (the next `update` starts a new interval)."""
        self._last = None

    def discount(self, seconds: float) -> None:
        """Leaves `seconds` (evaluation, saving) out of the current interval."""
        if self._last is not None:
            self._last = (self._last[0], self._last[1] + seconds)

    def line(self, step: int, metrics: Mapping[str, Any], rates: Mapping[str, float]) -> str:
        """The console progress line."""
        parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}"]
        if rates:
            parts.append(f"{rates[f'{self.unit}_per_sec']:,.0f} {self.unit}/s")
            if "mfu" in rates:
                parts.append(f"MFU {100 * rates['mfu']:.1f}%")
            parts.append(f"ETA {_duration(rates['eta_sec'])}")
        return " | ".join(parts)
