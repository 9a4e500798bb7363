"""`qtransformers reproduce` end to end on a shrunken config (tiny model, a few steps, two
methods): the report, its JSON and every PNG are written and well formed, and a rerun resumes
instead of retraining."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from qtransformers.reproduce import main as reproduce_main
from qtransformers.reproduce.default_config import get_config
from qtransformers.reproduce.runner import ordered_methods, run_reproduce
from qtransformers.train.loop import train_and_evaluate


def _two_method_config():
    config = get_config("tiny")
    config.reproduce.methods = {"gated": {"gate": "linear", "gate_init": 0.25}, "vanilla": {}}
    config.train.num_steps = 6
    config.train.outlier_eval_every = 3
    config.train.checkpoint_every = 3
    # the trainer's evaluators see the batches reproduce evaluates (2 x 8 rows) and run PTQ as
    # reproduce does at the last step: test_trainer_evaluate_and_reproduce_agree
    config.train.update(eval_steps=2, outlier_eval_steps=2)
    config.evals.ptq = dict(type="ptq", every=6, num_batches=2, seeds=(0,),
                            num_calib_batches=2, calib_batch_size=8)
    return config


def _check_png(path: str) -> None:
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt file raises here
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), np.float32)
    assert image.format == "PNG" and min(image.size) >= 200, (path, image.size)
    assert pixels.std() > 5.0, f"{path} is blank"


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reproduce"))
    calls = []

    def counting_train(cfg, run_dir):
        calls.append(run_dir)
        # one device, as `qtransformers evaluate` and reproduce's evaluation run: on an 8-way
        # data-parallel mesh the FP and outlier numbers still agree to 1e-6, but the W8A8 ones
        # only to ~2e-5 (other float rounding moves a few values across quantization bins)
        return train_and_evaluate(cfg, run_dir, devices=jax.local_devices()[:1])

    report = run_reproduce(_two_method_config(), workdir, train_fn=counting_train,
                           command="pytest")
    return workdir, report, calls


def test_report_json_and_markdown(reproduced):
    workdir, report, calls = reproduced
    assert sorted(os.path.basename(c) for c in calls) == ["gated-seed0", "vanilla-seed0"]
    with open(os.path.join(workdir, "report.json")) as f:
        saved = json.load(f)
    assert [row["method"] for row in saved["rows"]] == ["vanilla", "gated"]
    for row in saved["rows"]:
        assert np.isfinite([row["fp"], row["max_inf_norm"], row["avg_kurtosis"],
                            row["w8a8_mean"], row["w8a8_std"]]).all()
        assert row["fp"] > 1.0 and row["max_inf_norm"] > 0.0 and row["avg_kurtosis"] > 1.0
        assert row["w8a8_gap"] == pytest.approx(row["w8a8_mean"] - row["fp"])
        with open(os.path.join(workdir, "runs", f"{row['method']}-seed0", "eval.json")) as f:
            run = json.load(f)  # one training seed: the change of that run's mean W8A8 loss
        assert row["w8a8_loss_change"] == pytest.approx(
            np.mean(run["w8a8"]["losses"]) - run["fp"]["loss"])
        # two PTQ seeds, pooled mean / std of the per-seed perplexities
        values = saved["results"][row["method"]]["w8a8"]["values"]
        assert len(values) == 2
        assert row["w8a8_mean"] == pytest.approx(np.mean(values))
    assert saved["verdict"]["developed"] in (True, False)
    assert saved["paper"]["model"].startswith("OPT")
    history = saved["results"]["vanilla"]["history"]
    assert [h["step"] for h in history] == [3, 6]
    assert {"first_token_max_abs", "rest_max_abs", "first_token_attention"} <= set(history[0])

    text = open(os.path.join(workdir, "report.md")).read()
    assert "| vanilla |" in text and "| gated |" in text and "Table 2" in text
    assert saved["verdict"]["text"] in text
    for name in saved["figures"].values():
        assert f"]({name})" in text
    assert "W8A8 = mean ± std over PTQ seeds)" in text and "## Figures\n" in text
    from qtransformers.reproduce.report import render_markdown
    for row in saved["rows"]:
        row["seeds"] = 2  # a two-seed report says what its numbers and figures are
    text = render_markdown(saved)
    assert "means over 2 training seeds; W8A8 = mean ± std over training × PTQ seeds" in text
    assert "## Figures (the first training seed's runs)" in text


def test_trainer_evaluate_and_reproduce_agree(reproduced, tmp_path):
    """One evaluation road: the trainer's evaluators at its last step, `qtransformers evaluate`
    on the checkpoint and reproduce's evaluation give the same FP loss, tracked-site outlier
    metrics and W8A8 numbers on the same batches and calibration seeds."""
    from qtransformers.evaluate import main as evaluate_main
    from qtransformers.train.writers import read_metrics
    workdir, _, _ = reproduced
    run_dir = os.path.join(workdir, "runs", "vanilla-seed0")
    logged = {split: read_metrics(run_dir, split=split)[6] for split in ("eval", "outliers", "ptq")}
    with open(os.path.join(run_dir, "eval.json")) as f:
        reproduced_eval = json.load(f)
    out = str(tmp_path / "evaluate.json")
    assert evaluate_main.main(["--checkpoint", run_dir, "--num_eval_batches=2", "--batch_size=8",
                               "--seeds=0,1", "--num_calib_batches=2", "--calib_batch_size=8",
                               "--no_quantized_outliers", "--out", out]) == 0
    with open(out) as f:
        cli = json.load(f)
    trainer_w8a8 = [logged["ptq"]["quantized_perplexity"], logged["ptq"]["quantized_loss"]]
    for name, values in {
            "fp loss": [logged["eval"]["loss"], logged["ptq"]["fp_loss"],
                        reproduced_eval["fp"]["loss"], cli["ptq"]["fp"]["loss"]],
            "max_inf_norm": [logged["outliers"]["max_inf_norm"],
                             reproduced_eval["outliers"]["max_inf_norm"],
                             cli["outliers"]["max_inf_norm"]],
            "avg_kurtosis": [logged["outliers"]["avg_kurtosis"],
                             reproduced_eval["outliers"]["avg_kurtosis"],
                             cli["outliers"]["avg_kurtosis"]],
            "w8a8 perplexity, loss (PTQ seed 0)": [
                trainer_w8a8,
                [reproduced_eval["w8a8"]["values"][0], reproduced_eval["w8a8"]["losses"][0]],
                [cli["ptq"]["quantized"]["per_seed"][0]["perplexity"],
                 cli["ptq"]["quantized"]["per_seed"][0]["loss"]]]}.items():
        np.testing.assert_allclose(values, [values[0]] * len(values), rtol=1e-6, err_msg=name)
    assert reproduced_eval["w8a8"]["values"] == pytest.approx(
        [r["perplexity"] for r in cli["ptq"]["quantized"]["per_seed"]], rel=1e-6)
    # the block-output view keeps its own names beside the paper's tracked sites
    assert {"block_kurtosis", "block_max_inf_norm"} <= set(logged["outliers"])
    assert logged["ptq"]["fp_loss"] != logged["ptq"]["quantized_loss"]

    # `evaluate --evals` runs the evaluators the run's config declares: the trainer's log again
    assert evaluate_main.main(["--checkpoint", run_dir, "--evals=all", "--out", out]) == 0
    with open(out) as f:
        declared = json.load(f)["evals"]
    assert sorted(declared) == ["eval", "outliers", "ptq"]
    assert declared["ptq"]["quantized"]["mean"] == pytest.approx(
        logged["ptq"]["quantized_perplexity"], rel=1e-6)
    for key in ("max_inf_norm", "avg_kurtosis", "block_kurtosis", "first_token_attention"):
        assert declared["outliers"][key] == pytest.approx(logged["outliers"][key], rel=1e-6)


def test_every_png_is_well_formed(reproduced):
    workdir, report, _ = reproduced
    pngs = sorted(f for f in os.listdir(workdir) if f.endswith(".png"))
    assert pngs == sorted(report["figures"].values())
    assert {"per_layer_outliers.png", "outliers_over_training.png", "outlier_channels.png",
            "attention_vanilla.png", "attention_gated.png", "gates_gated.png"} <= set(pngs)
    for name in pngs:
        _check_png(os.path.join(workdir, name))


def test_rerun_resumes_without_retraining(reproduced):
    workdir, first, _ = reproduced

    def must_not_train(cfg, run_dir):
        raise AssertionError(f"retrained {run_dir}")

    again = run_reproduce(_two_method_config(), workdir, train_fn=must_not_train)
    assert again["rows"] == first["rows"]  # evaluations are read back, not recomputed

    # A run whose evaluation is missing is evaluated again, still without training.
    os.remove(os.path.join(workdir, "runs", "gated-seed0", "eval.json"))
    again = run_reproduce(_two_method_config(), workdir, train_fn=must_not_train)
    np.testing.assert_allclose([r["fp"] for r in again["rows"]],
                               [r["fp"] for r in first["rows"]], rtol=1e-5)


def test_bad_reproduce_configs_fail_before_training(tmp_path):
    config = _two_method_config()
    config.reproduce.methods = {"gated": {"gate": "linear"}}
    with pytest.raises(ValueError, match="must include 'vanilla'"):
        run_reproduce(config, str(tmp_path), train_fn=None)
    config.reproduce.methods = {"vanilla": {}, "odd": {"not_a_field": 1}}
    with pytest.raises(ValueError, match="unknown model fields"):
        run_reproduce(config, str(tmp_path))
    config.reproduce.methods = {"vanilla": {}}
    with pytest.raises(ValueError, match="local"):
        run_reproduce(config, "gs://bucket/reproduce")
    assert not os.listdir(tmp_path)
    assert reproduce_main.main(["qtransformers reproduce", "--workdir", str(tmp_path / "x"),
                                "--config.train.global_batch_size=-3"]) == 2


def test_method_order_follows_the_paper():
    assert ordered_methods({"gated": 1, "z": 1, "vanilla": 1, "clipped": 1}) == [
        "vanilla", "clipped", "gated", "z"]


@pytest.mark.parametrize("preset", ["cpu", "wikitext", "wikitext_h8", "wikitext_long", "gpu",
                                    "gpu,methods=sweep", "wikitext_h8,methods=sweep",
                                    "wikitext_h8,methods=field",
                                    "bert_base", "opt_125m", "vit_s16"])
def test_reproduce_presets_validate(preset):
    from qtransformers.models.registry import PAPER_METHODS
    from qtransformers.reproduce.runner import method_config, validate_reproduce_config
    from qtransformers.train.config import load_config_file, validate_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config_file(os.path.join(root, "configs", "reproduce.py"), preset)
    validate_reproduce_config(config)
    # the gpu preset's WikiText-103 lives on the GPU machine, not here
    models = {m: validate_config(method_config(config, m, 1), check_paths=not preset.startswith("gpu"))
              for m in ordered_methods(config.reproduce.methods)}
    assert models["clipped"].resolved_gamma < 0 and models["gated"].gate != "none"
    if models["vanilla"].family != "vit":  # γ = −α/T at the length the model trains on
        for model in models.values():
            if model.alpha is not None:
                assert model.resolved_gamma == pytest.approx(-model.alpha / config.data.seq_len)
    if preset in ("bert_base", "opt_125m", "vit_s16"):
        family = models["vanilla"].family
        for method, fields in PAPER_METHODS[family].items():
            for key, value in fields.items():
                assert getattr(models[method], key) == value, (method, key)
        # the per-method recipe of configs/opt_125m.py: LayerNorm scale decay off for vanilla
        if family == "opt":
            assert [method_config(config, m, 0).optim.decay_ln_scale
                    for m in ("vanilla", "clipped", "gated")] == [False, True, True]
        assert tuple(config.reproduce.train_seeds) == (0, 1)


def test_curves_cli_plots_and_tabulates_trainer_runs(reproduced, tmp_path, capsys):
    from qtransformers.reproduce import curves
    workdir, report, _ = reproduced
    runs = [os.path.join(workdir, "runs", f"{m}-seed0") + f"={m}" for m in ("vanilla", "gated")]
    out = str(tmp_path / "curves.png")
    assert curves.main([*runs, "--out", out, "--table"]) == 0
    _check_png(out)
    table = capsys.readouterr().out
    history = report["results"]["vanilla"]["history"]
    assert f"| vanilla | 6 | {history[-1]['avg_kurtosis']:.3g} |" in table
    assert curves.main([str(tmp_path), "--out", out]) == 2  # not a trainer workdir


def test_changed_budget_retrains_exactly_the_affected_runs(reproduced, tmp_path):
    """A rerun never reports stale models: a run whose training config changed (here the
    gated method's budget, 6 -> 8 steps) is moved to superseded/ and trained and evaluated
    again; the unchanged vanilla run is reused."""
    import shutil
    source, first, _ = reproduced
    workdir = str(tmp_path / "copy")
    shutil.copytree(source, workdir)
    calls = []

    def counting_train(cfg, run_dir):
        calls.append(os.path.basename(run_dir))
        return train_and_evaluate(cfg, run_dir)

    config = _two_method_config()
    config.reproduce.methods.gated.train = {"num_steps": 8}
    report = run_reproduce(config, workdir, train_fn=counting_train)
    assert calls == ["gated-seed0"]
    superseded = os.listdir(os.path.join(workdir, "superseded"))
    assert len(superseded) == 1 and superseded[0].startswith("gated-seed0-")
    run_dir = os.path.join(workdir, "runs", "gated-seed0")
    with open(os.path.join(run_dir, "train_done.json")) as f:
        done = json.load(f)
    assert done["step"] == done["num_steps"] == 8
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["config"]["train"]["num_steps"] == 8
    with open(os.path.join(run_dir, "eval.json")) as f:
        history = json.load(f)["history"]  # the new run's outlier evaluations
    assert [h["step"] for h in history] == [3, 6, 8]
    assert {name: run["steps"] for name, run in report["run"]["runs"].items()} == {
        "vanilla-seed0": 6, "gated-seed0": 8}
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["vanilla"] == {r["method"]: r for r in first["rows"]}["vanilla"]
    assert rows["gated"]["fp"] != {r["method"]: r for r in first["rows"]}["gated"]["fp"]
