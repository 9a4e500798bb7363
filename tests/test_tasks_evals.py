"""The Task per model family and the evaluator registry: lookups, one metric convention, the
config schema and its errors (fast: no model is compiled)."""
import numpy as np
import pytest

from qtransformers.evals import (Evaluator, build_evaluators, calibration_seed,
                                 evaluator_types, register_evaluator, train_evals)
from qtransformers.models import get_model_config
from qtransformers.models.tasks import (SUM_KEYS, CausalLM, ImageClassification, MaskedLM,
                                        get_task)
from qtransformers.train.config import base_config, validate_config


def test_tasks_by_family_name_objective_and_config():
    assert isinstance(get_task("bert"), MaskedLM) and isinstance(get_task("clm"), CausalLM)
    assert get_task("image") is get_task("classification") is get_task("vit")
    assert get_task(get_model_config("opt_tiny")) is get_task("opt")
    vit = get_task("vit")
    assert (vit.headline_metric, vit.higher_is_better, vit.data_objective,
            vit.default_ptq_preset) == ("accuracy", True, "image", "w8a8_vit")
    assert (get_task("opt").headline_metric, get_task("opt").higher_is_better) == (
        "perplexity", False)
    with pytest.raises(ValueError, match="known model families"):
        get_task("gpt9")


def test_metric_sums_one_convention_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (3, 5))
    weights = (rng.random((3, 5)) < 0.6).astype(np.float32)
    sums = get_task("opt").metric_sums(logits, {"targets": targets, "weights": weights})
    assert set(sums) == set(SUM_KEYS)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(sums["loss_sum"]), (nll * weights).sum(), rtol=1e-5)
    correct = ((logits.argmax(-1) == targets) * weights).sum()
    out = get_task("opt").finalize(sums)
    assert out["accuracy"] == pytest.approx(correct / weights.sum())  # a fraction, not %
    assert out["perplexity"] == pytest.approx(np.exp((nll * weights).sum() / weights.sum()))
    # classification: padding rows (weight 0) do not count; no perplexity column
    image_logits = rng.standard_normal((4, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0])
    image = ImageClassification().metric_sums(
        image_logits, {"label": labels, "weights": np.array([1, 1, 1, 0], np.float32)})
    result = get_task("vit").finalize(image)
    assert float(image["weight_sum"]) == 3.0 and "perplexity" not in result
    assert result["accuracy"] == pytest.approx(
        float((image_logits.argmax(-1) == labels)[:3].mean()))


def test_train_evals_aliases_and_declared_evals():
    config = base_config("opt_tiny")
    config.train.update(eval_every=10, eval_steps=3, outlier_eval_every=5,
                        outlier_eval_steps=2)
    assert train_evals(config) == {
        "eval": {"type": "fp", "every": 10, "num_batches": 3},
        "outliers": {"type": "outliers", "every": 5, "num_batches": 2, "block_view": True}}
    config.evals.outliers = dict(type="block_outliers", every=7)  # replaces the alias
    config.evals.ptq = dict(type="ptq", every=20, seeds=(0, 1))
    evaluators = build_evaluators(train_evals(config), "opt")
    assert [(n, e.type_name, e.every) for n, e in evaluators.items()] == [
        ("eval", "fp", 10), ("outliers", "block_outliers", 7), ("ptq", "ptq", 20)]
    ptq = evaluators["ptq"]
    assert ptq.seeds == (0, 1) and ptq.quant_config().act_bits == 8
    assert ptq.due(20, False) and ptq.due(3, True) and not ptq.due(19, False)
    assert calibration_seed(1) == 10_001  # every path calibrates PTQ seed 1 on these rows


@pytest.mark.parametrize("settings,message", [
    ({"type": "ppl"}, "evals.x.type='ppl' is unknown"),
    ({"type": "ptq", "seed": 3}, "unknown settings \\['seed'\\]"),
    ({"type": "ptq", "quantize": "half"}, "quantize='half'"),
    ({"type": "ptq", "preset": "w3a3"}, "preset='w3a3'"),
    ({"type": "fp", "every": -1}, "every=-1"),
    ({"type": "sensitivity", "group_by": "head"}, "group_by='head'"),
])
def test_bad_evals_fail_validation_with_the_field(settings, message):
    config = base_config("opt_tiny")
    config.data.update(source="builtin", tokenizer="byte", objective="clm", seq_len=32)
    config.evals.x = settings
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_a_new_evaluator_type_is_one_class():
    @register_evaluator("count_batches")
    class CountBatches(Evaluator):
        settings = {"scale": 1}

        def run(self, model, params, data):
            return {"batches": self.scale * len(data.eval_batches(self.num_batches))}

    assert "count_batches" in evaluator_types()
    (evaluator,) = build_evaluators({"n": {"type": "count_batches", "scale": 2,
                                           "num_batches": 3}}, "opt").values()

    class Data:
        def eval_batches(self, num, batch_size=0):
            return [None] * num

    assert evaluator.scalars(evaluator.run(None, None, Data())) == {"batches": 6.0}


def test_restore_run_raises_typed_errors_not_system_exit(tmp_path):
    import json

    from qtransformers.commandline import UserError
    from qtransformers.train.checkpointing import (NoCheckpointError, NotARunError,
                                                   restore_run)
    with pytest.raises(NotARunError, match="no config.json"):
        restore_run(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NotARunError, match="not valid JSON"):
        restore_run(str(tmp_path))
    resolved = get_model_config("opt_tiny").to_dict()
    (tmp_path / "config.json").write_text(json.dumps({"resolved_model": resolved}))
    with pytest.raises(NoCheckpointError, match="no finalized checkpoint") as err:
        restore_run(str(tmp_path))
    assert isinstance(err.value, UserError)  # commands print it as one line, exit 2
