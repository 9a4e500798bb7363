"""Metric writers (tensorboardX + JSONL, process 0 only; local or gs:// workdirs) and the console
progress line."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

from qtransformers import fileio

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

    Does nothing unless `enabled` (process 0). A remote workdir (gs://...) cannot be appended
    to, so both files are then written to a local staging folder and copied to the workdir
    every `sync_every_secs` seconds and on `close` (a resumed run first downloads the existing
    metrics.jsonl); TensorBoard reads the copied event files from gs:// directly. A failed copy
    is logged and retried at the next sync, never raised into training.

    keep_through_step: a run resumed from the checkpoint of this step first drops the
    metrics.jsonl rows of later steps (written before the previous run died; they are trained
    again), so every step is recorded once. None keeps every row.
    """

    def __init__(self, workdir: str, enabled: bool = True, sync_every_secs: float = 60.0,
                 keep_through_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._remote: str | None = None
        self.local_dir = workdir
        if not enabled:
            return
        if fileio.is_remote(workdir):
            self._remote, self.local_dir = workdir, self._stage(workdir)
        else:
            os.makedirs(workdir, exist_ok=True)
        self._sync_every, self._last_sync = sync_every_secs, time.monotonic()
        self._uploaded: dict[str, tuple[int, int]] = {}  # staged file -> (size, mtime_ns)
        if keep_through_step is not None:
            drop_rows_after(os.path.join(self.local_dir, METRICS_FILE), keep_through_step)
        self._jsonl = open(os.path.join(self.local_dir, METRICS_FILE), "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(self.local_dir, "tensorboard"))
        except ImportError:  # optional: the JSONL file has everything
            logger.warning("tensorboardX is not installed; writing metrics.jsonl only.")

    @staticmethod
    def _stage(workdir: str) -> str:
        """A local staging folder holding a copy of the remote metrics.jsonl (if any)."""
        local = tempfile.mkdtemp(prefix="qtransformers-logs-")
        remote_jsonl = os.path.join(workdir, METRICS_FILE)
        if fileio.exists(remote_jsonl):
            with open(os.path.join(local, METRICS_FILE), "wb") as f:
                f.write(fileio.read_bytes(remote_jsonl))
        logger.info("workdir %s is remote: metrics.jsonl and TensorBoard events are written to "
                    "%s and copied to the workdir periodically and at the end.", workdir, local)
        return local

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
        if self._remote and time.monotonic() - self._last_sync >= self._sync_every:
            self.sync()

    def sync(self) -> bool:
        """Copies the staged files that changed to the remote workdir (no-op for a local one);
        returns False (after a warning) when a copy failed."""
        if not self._remote:
            return True
        self._last_sync = time.monotonic()
        if self._tb is not None:
            self._tb.flush()
        ok = True
        for root, _, names in os.walk(self.local_dir):
            for name in sorted(names):
                local = os.path.join(root, name)
                stat = os.stat(local)
                if self._uploaded.get(local) == (stat.st_size, stat.st_mtime_ns):
                    continue
                relative = os.path.relpath(local, self.local_dir).replace(os.sep, "/")
                try:
                    fileio.copy_to(local, f"{self._remote.rstrip('/')}/{relative}")
                except Exception as err:  # network / permission errors of many types
                    logger.warning("could not copy %s to %s (%s: %s); retrying at the next "
                                   "sync.", local, self._remote, type(err).__name__, err)
                    ok = False
                    continue
                self._uploaded[local] = (stat.st_size, stat.st_mtime_ns)
        return ok

    def close(self) -> None:
        """Flushes and closes both files (and copies them to a remote workdir)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._remote:
            if self.sync():
                shutil.rmtree(self.local_dir, ignore_errors=True)
            else:
                logger.warning("the logs of %s stay in %s; copy them by hand.", self._remote,
                               self.local_dir)
            self._remote = None


def drop_rows_after(path: str, step: int) -> int:
    """Rewrites the local JSONL file `path` without its rows of steps > `step` (a no-op when
    there are none or no file); returns how many rows were dropped. Unparsable lines (a row cut
    by a kill) are dropped too."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    kept, dropped = [], 0
    for line in filter(str.strip, lines):
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        fileio.write_text(path, "".join(line + "\n" for line in kept))
        logger.info("%s: dropped %d rows past the restored step %d (they are trained again).",
                    path, dropped, step)
    return dropped


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
    if not fileio.exists(path):
        return out
    for line in fileio.read_text(path).split("\n"):
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
