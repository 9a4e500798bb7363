"""BERT masking: 15% of non-special tokens selected, 80/10/10, deterministic, specials and padding
never selected."""
import numpy as np

from qtransformers.data import (build_tokenizer, default_data_config, make_eval_iterator,
                                make_train_iterator, mlm_mask)


def _mlm_cfg(**overrides):
    cfg = default_data_config()
    cfg.objective, cfg.seq_len, cfg.prefetch = "mlm", 128, 0
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def test_mlm_mask_statistics_large_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, size=(1024, 128)).astype(np.int32)
    selectable = rng.random(ids.shape) < 0.9
    inputs, weights = mlm_mask(ids, selectable, np.random.default_rng(1), vocab_size=1000,
                               mask_id=4, probability=0.15)
    sel = weights == 1
    assert inputs.dtype == np.int32 and weights.dtype == np.float32
    assert not sel[~selectable].any()
    assert abs(sel.sum() / selectable.sum() - 0.15) < 0.004  # n = 118k, std 0.001
    masked = (inputs == 4)[sel].mean()
    random = ((inputs != 4) & (inputs != ids))[sel].mean()
    kept = (inputs == ids)[sel].mean()
    assert abs(masked - 0.8) < 0.01 and abs(random - 0.1) < 0.01 and abs(kept - 0.1) < 0.01
    np.testing.assert_array_equal(inputs[~sel], ids[~sel])  # unselected positions untouched


def test_pipeline_masking_statistics_and_specials():
    cfg = _mlm_cfg()
    tok = build_tokenizer(cfg)
    batch = next(make_train_iterator(cfg, global_batch_size=256))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "targets", "weights"}
    assert all(v.shape == (256, 128) for v in batch.values())
    targets, inputs, sel = batch["targets"], batch["input_ids"], batch["weights"] == 1
    special = np.isin(targets, tok.special_ids)
    assert (targets[:, 0] == tok.cls_id).all() and special.sum() > 256  # [CLS] + [SEP]s
    assert not sel[special].any()
    assert abs(sel.sum() / (~special).sum() - 0.15) < 0.01  # n = 31k non-special tokens
    assert abs((inputs[sel] == tok.mask_id).mean() - 0.8) < 0.03
    assert abs((inputs[sel] == targets[sel]).mean() - 0.1) < 0.025
    np.testing.assert_array_equal(inputs[~sel], targets[~sel])
    assert (batch["token_type_ids"] == 0).all() and (batch["attention_mask"] == 1).all()


def test_padding_never_selected_in_line_rows():
    cfg = _mlm_cfg(packing="lines", seq_len=64)
    tok = build_tokenizer(cfg)
    batch = next(make_train_iterator(cfg, global_batch_size=128))
    pad = batch["attention_mask"] == 0
    assert pad.sum() > 1000  # short lines leave padding
    assert (batch["targets"][pad] == tok.pad_id).all() and not batch["weights"][pad].any()
    lengths = batch["attention_mask"].sum(1)
    rows = np.arange(128)
    assert (batch["targets"][rows, lengths - 1] == tok.sep_id).all()  # [CLS] ... [SEP]
    assert (batch["targets"][:, 0] == tok.cls_id).all()


def test_masks_are_a_function_of_seed_and_step():
    cfg = _mlm_cfg()
    a = make_train_iterator(cfg, global_batch_size=8, seed=3)
    b = make_train_iterator(cfg, global_batch_size=8, seed=3)
    c = make_train_iterator(cfg, global_batch_size=8, seed=4)
    for _ in range(2):
        xa, xb, xc = next(a), next(b), next(c)
        np.testing.assert_array_equal(xa["input_ids"], xb["input_ids"])
        assert not np.array_equal(xa["weights"], xc["weights"])
    # Evaluation masks are fixed: two passes score the same positions.
    e1 = [x["weights"] for x in make_eval_iterator(cfg, batch_size=16)]
    e2 = [x["weights"] for x in make_eval_iterator(cfg, batch_size=16)]
    np.testing.assert_array_equal(np.concatenate(e1), np.concatenate(e2))
