"""TFDS text and image pipelines, offline through tfds.testing.mock_data (no TensorFlow)."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from qtransformers.data import (build_tokenizer, default_data_config, make_eval_iterator,
                                make_train_iterator, num_classes)
from qtransformers.data.sources import TFDSTexts, clean_text


def _text_cfg(**overrides):
    cfg = default_data_config()
    cfg.source, cfg.tfds_name, cfg.eval_split, cfg.seq_len = "tfds", "lm1b", "test", 24
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _image_cfg(name: str, **overrides):
    cfg = default_data_config()
    cfg.source, cfg.tfds_name, cfg.objective, cfg.image_size = "tfds", name, "image", 16
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _pieces(batch, sep_id):
    """Complete lines (between two [SEP]s) in the rows of a packed byte-level batch."""
    out = []
    for row in batch["input_ids"]:
        seps = np.flatnonzero(row == sep_id)
        out += [bytes(row[a + 1:b].tolist()).decode() for a, b in zip(seps[:-1], seps[1:])]
    return out


def test_streamed_text_resumes_and_shards_are_disjoint():
    cfg = _text_cfg()
    with tfds.testing.mock_data(num_examples=40):
        tok = build_tokenizer(cfg)
        docs = TFDSTexts(cfg, "train")
        texts = [docs[i] for i in range(len(docs))]
        it = make_train_iterator(cfg, global_batch_size=4, process_index=1, process_count=2)
        first = [next(it) for _ in range(3)]
        assert first[0]["input_ids"].shape == (2, 24)
        assert (first[0]["input_ids"][:, 0] == tok.cls_id).all()
        state = json.loads(json.dumps(it.get_state()))
        assert state["kind"] == "streamed" and state["step"] == 3
        expected = [next(it) for _ in range(4)]  # crosses into the second epoch
        fresh = make_train_iterator(cfg, global_batch_size=4, process_index=1, process_count=2)
        fresh.set_state(state)
        for a, b in zip(expected, [next(fresh) for _ in range(4)]):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        # Process 1 reads only documents 20..39, process 0 only 0..19.
        p0 = make_train_iterator(cfg, global_batch_size=4, process_index=0, process_count=2)
        lines0 = {p for _ in range(6) for p in _pieces(next(p0), tok.sep_id)}
        lines1 = {p for b in first + expected for p in _pieces(b, tok.sep_id)}
        assert lines0 and lines1
        assert lines0 <= {t.strip() for t in texts[:20]}
        assert lines1 <= {t.strip() for t in texts[20:]}
        with pytest.raises(ValueError, match="process_count=2 but this iterator was built with "
                                             "process_count=4"):
            make_train_iterator(cfg, global_batch_size=4, process_index=1,
                                process_count=4).set_state(state)


def test_text_lines_mode_and_eval():
    cfg = _text_cfg(packing="lines", objective="mlm", tokenizer="word", vocab_size=64)
    with tfds.testing.mock_data(num_examples=10):
        batch = next(make_train_iterator(cfg, global_batch_size=4))
        tok = build_tokenizer(cfg)
        assert batch["input_ids"].shape == (4, 24)
        assert (batch["targets"][:, 0] == tok.cls_id).all()
        ev = make_eval_iterator(cfg, batch_size=4)
        assert len(ev) == 3  # 10 documents -> 4 + 4 + 2 rows and 2 padding rows
        weights = [b["attention_mask"].sum(1) > 1 for b in ev]
        assert [w.sum() for w in weights] == [4, 4, 2]
        cfg.eval_max_documents, cfg.packing = 5, "packed"
        tokens = sum(b["attention_mask"][b["weights"].sum(1) > 0].sum()
                     for b in make_eval_iterator(cfg, batch_size=2))
        assert tokens > 5


def test_wiki40b_markup_is_removed():
    raw = b"\n_START_ARTICLE_\nTitle\n_START_PARAGRAPH_\nOne._NEWLINE_Two."
    assert [ln for ln in clean_text("wiki40b", raw).split("\n") if ln] == ["Title", "One.", "Two."]


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("imagenet2012", 1000)])
def test_image_pipeline(name: str, classes: int):
    cfg = _image_cfg(name)
    cfg.augment.mixup_alpha, cfg.augment.cutmix_alpha = 0.2, 1.0
    with tfds.testing.mock_data(num_examples=10):
        assert num_classes(cfg) == classes
        it = make_train_iterator(cfg, global_batch_size=4)
        batch = next(it)
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["label_probs"].shape == (4, classes)
        np.testing.assert_allclose(batch["label_probs"].sum(1), 1.0, rtol=1e-5)
        assert ((batch["label"] >= 0) & (batch["label"] < classes)).all()
        assert -3.0 < batch["image"].mean() < 3.0
        ev = list(make_eval_iterator(cfg, batch_size=4, process_index=1, process_count=2))
        assert len(ev) == 3 and [b["weights"].tolist() for b in ev][-1] == [0.0, 0.0]
        again = list(make_eval_iterator(cfg, batch_size=4, process_index=1, process_count=2))
        np.testing.assert_array_equal(ev[0]["image"], again[0]["image"])  # deterministic


def test_missing_tfds_dataset_is_a_clear_error(tmp_path):
    cfg = _text_cfg(tfds_name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.tfds_name='no_such_dataset_xyz' "
                                                "split='train' could not be opened"):
        make_train_iterator(cfg, global_batch_size=2)
