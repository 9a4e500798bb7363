"""Local-text pipeline on WikiText-2 (paper.md §8 setting), resumption and per-process shards."""
import json
from pathlib import Path

import numpy as np
import pytest

from qtransformers.data import (build_tokenizer, default_data_config, make_eval_iterator,
                                make_train_iterator)
from qtransformers.data.corpus import local_lines
from qtransformers.data.text_rows import PackedRows, encode_stream

WIKITEXT = Path(__file__).parents[1] / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"
needs_wikitext = pytest.mark.skipif(not WIKITEXT.is_file(),
                                    reason=f"WikiText-2 not found at {WIKITEXT}")


def _wikitext_cfg(objective: str = "clm"):
    """Word level, 2k vocabulary, [CLS] first, [SEP] at line breaks (paper.md §8)."""
    cfg = default_data_config()
    cfg.source, cfg.path, cfg.tokenizer, cfg.vocab_size = "text", str(WIKITEXT), "word", 2048
    cfg.objective, cfg.seq_len = objective, 64
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@needs_wikitext
def test_wikitext_word_level_clm(tmp_path: Path):
    cfg = _wikitext_cfg()
    tok = build_tokenizer(cfg, workdir=tmp_path)
    assert tok.vocab_size == 2048 and tok.words[:4] == ["the", "<unk>", ",", "."]
    batch = next(make_train_iterator(cfg, global_batch_size=64, workdir=tmp_path))
    ids = batch["input_ids"]
    assert ids.shape == (64, 64) and ids.dtype == np.int32
    assert (ids[:, 0] == tok.cls_id).all()  # the fixed first token
    sep_rate = (ids == tok.sep_id).mean()
    assert 0.005 < sep_rate < 0.03  # one [SEP] per WikiText line (~60-120 words)
    assert (ids == tok.unk_id).mean() < 0.2  # 2k words cover > 80% of running text
    assert batch["weights"].all() and batch["attention_mask"].all()  # packed: no padding
    # The eval split is the last 10% of the lines; its pass scores every token once.
    ev = make_eval_iterator(cfg, batch_size=64, workdir=tmp_path)
    batches = list(ev)
    assert len(batches) == len(ev) >= 2
    last = batches[-1]["weights"]
    assert last.sum() > 0 and (last.sum(1) == 0).any()  # padded, not dropped


@needs_wikitext
def test_resume_gives_the_same_batches():
    cfg = _wikitext_cfg("mlm")
    it = make_train_iterator(cfg, global_batch_size=8, seed=7)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # survives a checkpoint round trip
    assert state["step"] == 3
    expected = _take(it, 3)
    fresh = make_train_iterator(cfg, global_batch_size=8, seed=7)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)
    it.set_state(state)  # rewinding a running (prefetching) iterator works too
    _assert_batches_equal(_take(it, 3), expected)
    with pytest.raises(ValueError, match="global_batch_size=8 but this iterator was built with "
                                         "global_batch_size=16"):
        make_train_iterator(cfg, global_batch_size=16, seed=7).set_state(state)


def test_shards_are_disjoint_and_form_the_global_batch():
    cfg = default_data_config()  # built-in corpus: always present
    cfg.objective, cfg.seq_len = "mlm", 32
    whole = _take(make_train_iterator(cfg, global_batch_size=16), 2)
    parts = [_take(make_train_iterator(cfg, global_batch_size=16, process_index=p,
                                       process_count=4), 2) for p in range(4)]
    for step in range(2):
        for k in whole[step]:
            assert parts[0][step][k].shape[0] == 4
            joined = np.concatenate([parts[p][step][k] for p in range(4)])
            np.testing.assert_array_equal(joined, whole[step][k])
    rows = [tuple(r) for p in range(4) for r in parts[p][0]["targets"]]
    assert len(set(rows)) == 16  # disjoint rows
    # The state is topology-free: a 4-process run resumes a 1-process one.
    one = make_train_iterator(cfg, global_batch_size=16)
    _take(one, 1)
    quarter = make_train_iterator(cfg, global_batch_size=16, process_index=2, process_count=4)
    quarter.set_state(one.get_state())
    np.testing.assert_array_equal(next(quarter)["targets"], whole[1]["targets"][8:12])


def test_epochs_visit_every_row_once():
    cfg = default_data_config()
    cfg.seq_len, cfg.prefetch = 512, 0
    tok = build_tokenizer(cfg)
    stream = encode_stream(tok, local_lines(cfg, "train"), sep_at_line_breaks=True)
    rows = PackedRows(stream, objective="clm", seq_len=512, add_cls_first=True, cls_id=tok.cls_id,
                      pad_id=tok.pad_id, keep_tail=False)
    n = len(rows)
    assert 600 < n < 900
    it = make_train_iterator(cfg, global_batch_size=64)
    seen = np.concatenate([next(it)["targets"] for _ in range(2 * (n // 64 + 1))])
    epoch0, epoch1 = seen[:n], seen[n:2 * n]
    expected = sorted(tuple(rows[i][0][1:]) for i in range(n))
    assert sorted(map(tuple, epoch0)) == expected  # every row exactly once
    assert sorted(map(tuple, epoch1)) == expected
    assert not np.array_equal(epoch0, epoch1)  # in a fresh order


def test_text_folder_and_eval_path(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("alpha beta gamma\n\n delta epsilon \n")
    (tmp_path / "two.txt").write_text("zeta eta\ntheta iota kappa\n")
    (tmp_path / "skip.md").write_text("not read")
    (tmp_path / "eval.text").write_text("lambda mu\n")  # not *.txt: not in the folder's text
    cfg = default_data_config()
    cfg.source, cfg.path, cfg.eval_path = "text", str(tmp_path / "a"), str(tmp_path / "eval.text")
    cfg.tokenizer, cfg.vocab_size, cfg.seq_len, cfg.objective = "word", 16, 4, "mlm"
    tok = build_tokenizer(cfg)
    assert sorted(tok.words) == ["alpha", "beta", "delta", "epsilon", "gamma"]
    assert local_lines(cfg, "eval") == ["lambda mu"]
    cfg.path, cfg.eval_path = str(tmp_path), ""
    assert local_lines(cfg, "train") == ["alpha beta gamma", "delta epsilon", "zeta eta"]
    assert local_lines(cfg, "eval") == ["theta iota kappa"]
