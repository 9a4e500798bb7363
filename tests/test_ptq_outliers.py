"""Outlier metrics against NumPy, planted outliers, the quantized model, and the evaluate CLI."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from qtransformers import build_model, get_model_config
from qtransformers.evaluate import (collect_outlier_metrics, outlier_eval_fn,
                                     per_sample_outliers)
from qtransformers.evaluate.main import main
from qtransformers.nn.quant_point import QuantPoint
from qtransformers.quant import QuantConfig, calibrate

B, T = 4, 12


def text_batch(cfg, seed, pad=False):
    r = np.random.default_rng(seed)
    ids = r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    mask = np.ones_like(ids)
    if pad:
        mask[0, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def init(model, batch):
    fn = jax.jit(model.init)
    return nn.meta.unbox(fn(jax.random.PRNGKey(0), batch["input_ids"],
                            batch["attention_mask"])["params"])


def np_kurtosis(x):
    mu = x.mean()
    return ((x - mu) ** 4).mean() / (x.std(ddof=1) ** 4 + 1e-6)


def test_bert_metrics_equal_numpy_with_padding_excluded():
    cfg = get_model_config("bert_tiny", num_layers=1)
    model = build_model(cfg)
    batches = [text_batch(cfg, 0, pad=True), text_batch(cfg, 1)]
    params = init(model, batches[0])
    out = collect_outlier_metrics(model, params, batches)
    assert set(out["per_tensor"]) == {"encoder/layers_0/mlp/output_output",
                                      "encoder/layers_0/mlp_ln/output",
                                      "encoder/layers_0/mlp_residual"}
    assert "kurtosis" not in out["per_tensor"]["encoder/layers_0/mlp_residual"]
    site = "encoder/layers_0/mlp_ln/output"
    infs, kurts, chan = [], [], None
    capture = jax.jit(lambda p, b: model.apply(
        {"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"],
        mutable=["intermediates"], capture_intermediates=lambda m, _: isinstance(m, QuantPoint)))
    for b in batches:
        _, st = capture(params, b)
        x = np.asarray(st["intermediates"]["encoder"]["layers_0"]["mlp_ln"]["output"]
                       ["__call__"][0], np.float64)
        for i in range(B):
            real = x[i][b["attention_mask"][i].astype(bool)]  # (T_real, d)
            infs.append(np.abs(real).max())
            kurts.append(np_kurtosis(real.ravel()))
            c = np.abs(real).max(0)
            chan = c if chan is None else np.maximum(chan, c)
    entry = out["per_tensor"][site]
    np.testing.assert_allclose(entry["inf_norm"], np.mean(infs), rtol=1e-5)
    np.testing.assert_allclose(entry["kurtosis"], np.mean(kurts), rtol=1e-4)
    np.testing.assert_allclose(entry["excess_kurtosis"], np.mean(kurts) - 3, rtol=1e-4)
    np.testing.assert_allclose(out["channel_max"][site], chan, rtol=1e-5)
    assert out["num_samples"] == 2 * B
    kurt_sites = [v["kurtosis"] for v in out["per_tensor"].values() if "kurtosis" in v]
    np.testing.assert_allclose(out["avg_kurtosis"], np.mean(kurt_sites))
    assert out["max_inf_norm"] == max(v["inf_norm"] for v in out["per_tensor"].values())


def test_planted_outliers_raise_kurtosis_and_inf_norm():
    cfg = get_model_config("opt_tiny", num_layers=1)
    model = build_model(cfg)
    batches = [text_batch(cfg, 2), text_batch(cfg, 3)]
    params = init(model, batches[0])
    clean = collect_outlier_metrics(model, params, batches, "opt")
    planted = jax.tree_util.tree_map(np.array, params)
    planted["embed_tokens"]["embedding"][:, [5, 17]] *= 300  # two huge residual channels
    out = collect_outlier_metrics(model, planted, batches, "opt")
    assert clean["avg_kurtosis"] < 4 and out["avg_kurtosis"] > 10
    assert out["max_inf_norm"] > 10 * clean["max_inf_norm"]
    layer_out = "decoder/layers_0/mlp_residual"
    assert out["channels"][layer_out]["top_channels"][:2] in ([5, 17], [17, 5])
    assert out["per_tensor"][layer_out]["kurtosis"] > 20
    # The quantized model: same tracked tensors, values close to FP on the clean model.
    config = QuantConfig(num_calibration_batches=2)
    qranges = calibrate(model, params, batches, config)
    quant = collect_outlier_metrics(model, params, batches, "opt", qranges=qranges)
    assert set(quant["per_tensor"]) == set(clean["per_tensor"])
    np.testing.assert_allclose(quant["max_inf_norm_all"], clean["max_inf_norm_all"], rtol=0.05)
    assert quant["max_inf_norm_all"] != clean["max_inf_norm_all"]
    # The trainer hook: floats of one batch.
    summary = outlier_eval_fn(model, params, batches[0], "opt")
    assert all(isinstance(v, float) for v in summary.values())
    assert f"kurtosis/{layer_out}" in summary and "avg_kurtosis" in summary
    per_sample = per_sample_outliers(model, "opt", params, batches[0])  # the trainer's hook
    assert per_sample[f"kurtosis/{layer_out}"].shape == (B,)
    np.testing.assert_allclose(float(np.mean(per_sample[f"kurtosis/{layer_out}"])),
                               summary[f"kurtosis/{layer_out}"], rtol=1e-5)


def test_cli_random_init(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["--model", "opt_tiny", "--seeds", "0,1", "--num_eval_batches", "1",
                 "--num_calib_batches", "1", "--calib_batch_size", "2", "--batch_size", "2",
                 "--seq_len", "16", "--no_quantized_outliers", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FP perplexity" in printed and "W8A8 perplexity" in printed and "±" in printed
    report = json.loads(out.read_text())
    assert len(report["ptq"]["quantized"]["per_seed"]) == 2
    assert report["outliers"]["max_inf_norm"] > 0 and "outliers_quantized" not in report
    assert main(["--seeds", "0"]) == 2  # one line on stderr, no traceback
    assert "--model" in capsys.readouterr().err


def test_cli_sensitivity(tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["--model", "opt_tiny", "--seeds", "0", "--num_eval_batches", "1",
            "--num_calib_batches", "1", "--calib_batch_size", "2", "--batch_size", "2",
            "--seq_len", "16", "--no_quantized_outliers", "--out", str(out)]
    assert main(args + ["--sensitivity", "layer"]) == 0
    printed = capsys.readouterr().out
    assert "activations only" in printed and "layer layers_1" in printed
    sens = json.loads(out.read_text())["sensitivity"]
    assert sens["group_by"] == "layer" and set(sens["groups"]) == {"other", "layers_0",
                                                                    "layers_1"}
    assert sum(g["num_points"] for g in sens["groups"].values()) == \
        sens["activations_only"]["num_points"]
    assert main(args + ["--sensitivity", "site"]) == 2
    assert "--sensitivity='site' is unknown" in capsys.readouterr().err
