"""Causal-LM packing: targets are the inputs shifted by one and no token is lost."""
import numpy as np
import pytest

from qtransformers.data import build_tokenizer, default_data_config, make_eval_iterator
from qtransformers.data import make_train_iterator
from qtransformers.data.corpus import local_lines
from qtransformers.data.text_rows import PackedRows, encode_stream


def test_packed_row_geometry_with_and_without_cls():
    stream = np.arange(10, 40, dtype=np.int32)  # 30 tokens
    rows = PackedRows(stream, objective="clm", seq_len=8, add_cls_first=True, cls_id=2, pad_id=0,
                      keep_tail=False)
    assert len(rows) == 3  # 30 // 8 full rows; the tail of 6 tokens is dropped in training
    row, length = rows[1]
    assert length == 9 and row.tolist() == [2] + list(range(18, 26))
    rows = PackedRows(stream, objective="clm", seq_len=8, add_cls_first=False, cls_id=2, pad_id=0,
                      keep_tail=True)
    assert len(rows) == 4  # targets 11..39 need ceil(29 / 8) rows
    assert rows[0][0].tolist() == list(range(10, 19))  # 9 tokens: 8 inputs + the last target
    row, length = rows[3]
    assert length == 6 and row.tolist() == list(range(34, 40)) + [0, 0, 0]


@pytest.mark.parametrize("cls_first", [True, False])
def test_eval_blocks_cover_the_stream_exactly(cls_first: bool):
    cfg = default_data_config()
    cfg.seq_len, cfg.add_cls_first, cfg.prefetch = 64, cls_first, 0
    tok = build_tokenizer(cfg)
    stream = encode_stream(tok, local_lines(cfg, "eval"), sep_at_line_breaks=True)
    batches = list(make_eval_iterator(cfg, batch_size=32))
    x = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    w = x["weights"] == 1
    # Shifted: wherever the next input is real, it is the target of the previous position.
    both = w[:, :-1] & (x["attention_mask"][:, 1:] == 1)
    np.testing.assert_array_equal(x["input_ids"][:, 1:][both], x["targets"][:, :-1][both])
    # No token lost: the scored targets, in order, are the whole stream (minus the first
    # token when nothing precedes it), each exactly once.
    np.testing.assert_array_equal(x["targets"][w], stream if cls_first else stream[1:])
    if cls_first:
        real = x["weights"].any(axis=1)  # padding rows of the last batch have no weight
        assert (x["input_ids"][real, 0] == tok.cls_id).all()
    assert (stream == tok.sep_id).sum() == len(local_lines(cfg, "eval"))  # [SEP] per line


def test_train_blocks_in_order_without_shuffle():
    cfg = default_data_config()
    cfg.seq_len, cfg.shuffle, cfg.add_cls_first, cfg.prefetch = 32, False, False, 0
    tok = build_tokenizer(cfg)
    stream = encode_stream(tok, local_lines(cfg, "train"), sep_at_line_breaks=True)
    it = make_train_iterator(cfg, global_batch_size=4)
    batch = np.concatenate([next(it)["input_ids"] for _ in range(3)])
    np.testing.assert_array_equal(batch.reshape(-1), stream[: 12 * 32])
    assert set(next(it)) == {"input_ids", "attention_mask", "targets", "weights"}


def test_lines_rows_for_clm():
    cfg = default_data_config()
    cfg.packing, cfg.seq_len, cfg.prefetch = "lines", 48, 0
    tok = build_tokenizer(cfg)
    batch = next(make_eval_iterator(cfg, batch_size=8))
    first = local_lines(cfg, "eval")[0].encode()
    n = min(len(first), 48 - 1)  # [CLS] + line (+ [SEP]) fills T + 1 = 49 tokens
    assert batch["input_ids"][0, 0] == tok.cls_id
    assert bytes(batch["input_ids"][0, 1:n + 1].tolist()) == first[:n]
    lengths = batch["attention_mask"].sum(1)
    # A row of L <= 48 real inputs scores L - 1 targets; a full row (49 tokens) scores all 48.
    np.testing.assert_array_equal(batch["weights"].sum(1), np.where(lengths < 48, lengths - 1, 48))
    assert (batch["targets"][np.arange(8), batch["weights"].sum(1).astype(int) - 1]
            == tok.sep_id).all()
