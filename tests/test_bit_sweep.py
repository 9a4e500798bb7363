"""quant.bit_sweep against evaluate_ptq (the same protocol setting by setting), the report's
answers arithmetic, and the attention-map token labels."""
import jax
import numpy as np
import pytest

from qtransformers.models import ModelConfig, build_model
from qtransformers.quant.bit_sweep import bit_sweep, check_settings
from qtransformers.quant.config import get_preset
from qtransformers.quant.evaluate import evaluate_ptq
from qtransformers.reproduce import answers
from qtransformers.reproduce.analysis import token_labels
from qtransformers.reproduce.report import NEXT_STEP, next_step


def _clm_batches(n, seed, vocab=64, batch=4, length=12):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
        out.append({"input_ids": ids[:, :-1], "attention_mask": np.ones((batch, length), np.int32),
                    "targets": ids[:, 1:], "weights": np.ones((batch, length), np.float32)})
    return out


@pytest.fixture(scope="module")
def tiny_opt():
    cfg = ModelConfig(family="opt", vocab_size=64, d_model=16, num_layers=1, num_heads=2,
                      d_ff=32, max_len=16)
    model = build_model(cfg)
    batch = _clm_batches(1, 0)[0]
    params = model.init(jax.random.PRNGKey(0), batch["input_ids"],
                        batch["attention_mask"])["params"]
    return model, params


def test_each_setting_equals_evaluate_ptq(tiny_opt):
    model, params = tiny_opt
    evals = _clm_batches(2, 1)
    calib = lambda seed: _clm_batches(2, 100 + seed)  # noqa: E731
    base = get_preset("w8a8_opt").replace(num_calibration_batches=2, seeds=(0, 1))
    sweep = bit_sweep(model, params, evals, calib, base, [(6, "per_tensor"), (4, "per_token")])
    assert sweep["metric"] == "perplexity" and sweep["weight_bits"] == 8
    for row in sweep["rows"]:
        config = base.replace(act_bits=row["act_bits"], act_granularity=row["granularity"])
        ref = evaluate_ptq(model, params, evals, calib, config)
        assert sweep["fp"]["loss"] == pytest.approx(ref["fp"]["loss"], rel=1e-6)
        losses = [r["loss"] for r in ref["quantized"]["per_seed"]]
        np.testing.assert_allclose(row["per_seed"], losses, rtol=1e-6)
        assert row["loss"] == pytest.approx(np.mean(losses), rel=1e-6)
        assert row["loss_change"] == pytest.approx(row["loss"] - ref["fp"]["loss"], rel=1e-6)
    assert len(sweep["rows"][0]["per_seed"]) == 2 and len(sweep["rows"][1]["per_seed"]) == 1
    # fewer bits cost more on a random model (coarser grid)
    four = bit_sweep(model, params, evals, calib, base, [(4, "per_tensor")])["rows"][0]
    assert four["loss_change"] > sweep["rows"][0]["loss_change"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="granularity"):
        check_settings([(8, "per_channel")])
    with pytest.raises(ValueError):
        check_settings([(1, "per_tensor")])
    with pytest.raises(ValueError, match="at least one"):
        check_settings([])


def _result(changes, fp=10.0):
    return {"fp": {"perplexity": fp}, "bit_sweep": {"rows": [
        {"act_bits": b, "granularity": "per_tensor", "loss_change": c}
        for b, c in changes.items()]}}


def test_goal_and_first_breaking_bit_width():
    vanilla = _result({8: 0.01, 6: 0.09, 4: 0.9})
    gated = _result({8: 0.01, 6: 0.04, 4: 0.2})
    assert answers.first_breaking_bits(vanilla) == 6 and answers.first_breaking_bits(gated) == 4
    goal = answers.goal_status({"vanilla": vanilla, "gated": gated})
    assert goal["ratios"] == {6: pytest.approx(2.25), 4: pytest.approx(4.5)}
    assert goal["reached"] and goal["best_bits"] == 4
    goal = answers.goal_status({"vanilla": vanilla, "gated": _result({6: 0.05, 4: 0.5})})
    assert not goal["reached"] and goal["best_ratio"] == pytest.approx(1.8)
    # a method that loses nothing counts as losing RATIO_FLOOR_NATS, not zero
    assert answers.ratio(0.1, -0.002) == pytest.approx(0.1 / answers.RATIO_FLOOR_NATS)


def test_token_labels_tell_unk_from_a_real_question_mark():
    from qtransformers.data.tokenizers import WordTokenizer
    tok = WordTokenizer(["what", "?", "yes"], vocab_size=16)
    ids = [tok.cls_id, *tok.encode("what ?"), *tok.encode("zebra"), tok.sep_id, tok.pad_id]
    assert token_labels(tok, ids) == ["[CLS]", "what", "?", "[UNK]", "[SEP]", "[PAD]"]


def test_no_preset_is_advised_to_itself():
    for preset in ["main", "classic", "cpu", "tiny", "wikitext", *NEXT_STEP]:
        assert f"reproduce.py:{preset}`" not in next_step(preset)
