"""Data config defaults and validation errors (one clear error per problem)."""
from pathlib import Path

import pytest

from qtransformers.data import default_data_config, make_train_iterator, validate_data_config


def test_defaults_are_valid_and_need_no_files():
    cfg = default_data_config()
    validate_data_config(cfg)
    assert (cfg.source, cfg.tokenizer, cfg.objective) == ("builtin", "byte", "clm")
    assert cfg.mlm_probability == 0.15 and cfg.add_cls_first and cfg.sep_at_line_breaks


@pytest.mark.parametrize("field,value,match", [
    ("source", "hub", r"data.source='hub' is unknown; use one of builtin, text, tfds, synthetic"),
    ("objective", "seq2seq", r"data.objective='seq2seq' is unknown; use one of mlm, clm, image"),
    ("tokenizer", "gpt2", r"data.tokenizer='gpt2' is unknown"),
    ("packing", "sliding", r"data.packing='sliding' is unknown"),
    ("mlm_probability", 1.5, r"data.mlm_probability=1.5 must be in \(0, 1\)"),
    ("seq_len", 2, r"data.seq_len=2 is too short"),
])
def test_bad_values_name_the_field(field, value, match):
    cfg = default_data_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        validate_data_config(cfg)


def test_missing_text_path(tmp_path: Path):
    cfg = default_data_config()
    cfg.source = "text"
    with pytest.raises(ValueError, match="data.path is empty"):
        validate_data_config(cfg)
    cfg.path = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="data.path=.*nope.txt' does not exist"):
        validate_data_config(cfg)
    with pytest.raises(FileNotFoundError, match="nope.txt"):  # the iterator validates first
        make_train_iterator(cfg, global_batch_size=2)


def test_folder_without_txt_files(tmp_path: Path):
    cfg = default_data_config()
    cfg.source, cfg.path = "text", str(tmp_path)
    with pytest.raises(FileNotFoundError, match="folder without \\*.txt files"):
        make_train_iterator(cfg, global_batch_size=2)


def test_missing_tokenizer_file(tmp_path: Path):
    cfg = default_data_config()
    cfg.tokenizer = str(tmp_path / "tok.json")
    with pytest.raises(FileNotFoundError, match="tok.json.*no such file"):
        validate_data_config(cfg)


def test_source_objective_mismatch():
    cfg = default_data_config()
    cfg.objective = "image"
    with pytest.raises(ValueError, match="source='builtin' has no images"):
        validate_data_config(cfg)
    cfg = default_data_config()
    cfg.source = "synthetic"
    with pytest.raises(ValueError, match="source='synthetic' has no text"):
        validate_data_config(cfg)
    cfg = default_data_config()
    cfg.source = "tfds"
    with pytest.raises(ValueError, match="data.tfds_name is empty"):
        validate_data_config(cfg)


def test_batch_not_divisible_by_processes():
    cfg = default_data_config()
    with pytest.raises(ValueError, match="global_batch_size=6 is not a positive multiple of "
                                         "process_count=4"):
        make_train_iterator(cfg, global_batch_size=6, process_index=0, process_count=4)
