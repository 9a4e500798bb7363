"""Metric files, the progress line and the MFU table."""
import json

import pytest

from qtransformers.train import flops
from qtransformers.train.writers import MetricWriter, Throughput, read_metrics


def test_jsonl_records_and_resumed_steps_keep_the_last(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(1, "train", {"loss": 2.0, "nested": {"a": 1.0}})
    writer.write(2, "train", {"loss": float("nan")})
    writer.write(2, "train", {"loss": 1.5})  # a resumed run logs step 2 again
    writer.write(2, "eval", {"loss": 1.7})
    writer.close()
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert lines[1]["loss"] == "nan" and lines[0]["nested"] == {"a": 1.0}
    assert read_metrics(str(tmp_path))[2]["loss"] == 1.5
    assert read_metrics(str(tmp_path), "eval")[2]["loss"] == 1.7
    assert list((tmp_path / "tensorboard").iterdir())
    MetricWriter(str(tmp_path / "other"), enabled=False).write(1, "train", {"loss": 1.0})
    assert not (tmp_path / "other").exists()


def test_peak_flops_table_and_mfu():
    assert flops.peak_flops_per_device("TPU v4") == 275e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("TPU v5p") == 459e12
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3", "gpu") == 989e12
    assert flops.peak_flops_per_device("NVIDIA A100-SXM4-40GB", "gpu", "float32") == 156e12
    assert flops.peak_flops_per_device("cpu") is None
    per_token = flops.train_flops_per_token(100, num_layers=2, d_model=4, seq_len=8)
    assert per_token == 6 * 100 + 12 * 2 * 8 * 4
    assert flops.mfu(1e12, 1.0, 2, 1e12) == pytest.approx(0.5)
    assert flops.mfu(1e12, 1.0, 2, None) is None


def test_progress_line_has_rate_mfu_and_eta():
    meter = Throughput(items_per_step=1000, flops_per_step=1e9, num_devices=1,
                       peak_per_device=1e12, total_steps=100)
    assert meter.update(10) == {}
    rates = meter.update(20)
    line = meter.line(20, {"loss": 1.23456}, rates)
    assert "step 20/100" in line and "loss 1.2346" in line and "tokens/s" in line
    assert "MFU" in line and "ETA" in line
