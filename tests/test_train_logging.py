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


def test_outlier_eval_locates_first_token_and_attention_share():
    import jax
    import numpy as np

    from qtransformers.models import build_model, get_model_config
    from qtransformers.train.outliers import default_outlier_eval_fn, summarize_outliers

    cfg = get_model_config("opt_tiny", num_layers=2, d_model=32, num_heads=2, d_ff=64,
                           vocab_size=64)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 64, (3, 10)).astype(np.int32)
    mask = np.ones((3, 10), np.int32)
    mask[1, 6:] = 0  # padded tail: excluded from every statistic
    batch = {"input_ids": ids, "attention_mask": mask}
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    got = {k: np.asarray(v) for k, v in default_outlier_eval_fn(model, "opt", params,
                                                                 batch).items()}
    _, state = model.apply({"params": params}, ids, mask, deterministic=True,
                           mutable=["intermediates"])
    inter = state["intermediates"]["decoder"]
    for i in range(2):
        x = np.asarray(inter[f"layers_{i}"]["block_output"][0])       # (B, T, d)
        probs = np.asarray(inter[f"layers_{i}"]["attention"]["attention_probs"][0])
        layer = f"decoder/layers_{i}"
        np.testing.assert_allclose(got[f"first_token_inf_norm/{layer}"],
                                   np.abs(x[:, 0]).max(-1), rtol=1e-6)
        rest = [np.abs(x[b, 1:mask[b].sum()]).max() for b in range(3)]
        np.testing.assert_allclose(got[f"rest_inf_norm/{layer}"], rest, rtol=1e-6)
        share = [probs[b, :, :mask[b].sum(), 0].mean() for b in range(3)]
        np.testing.assert_allclose(got[f"first_token_attention/{layer}"], share, rtol=1e-5)
        # causal attention: the first query sees only the first key
        assert np.allclose(probs[:, :, 0, 0], 1.0)
    summary = summarize_outliers({k: float(v.mean()) for k, v in got.items()})
    assert summary["first_token_max_abs"] == max(
        got[f"first_token_inf_norm/decoder/layers_{i}"].mean() for i in range(2))
    np.testing.assert_allclose(summary["first_token_attention"], np.mean(
        [got[f"first_token_attention/decoder/layers_{i}"].mean() for i in range(2)]))


def test_config_json_stores_absolute_local_data_paths(tmp_path, monkeypatch):
    import json
    import os

    from qtransformers.train.config import base_config, model_config_from
    from qtransformers.train.loop import _write_config

    (tmp_path / "corpus.txt").write_text("some text\n")
    monkeypatch.chdir(tmp_path)
    config = base_config("opt_tiny")
    config.data.update(source="text", path="corpus.txt", tokenizer="word")
    _write_config(str(tmp_path / "run"), config, model_config_from(config))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]["data"]
    assert saved["path"] == os.path.join(str(tmp_path), "corpus.txt")
    assert saved["tokenizer"] == "word" and saved["eval_path"] == ""
