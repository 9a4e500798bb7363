"""Tokenizers: round trips, special ids, word vocabulary building and caching, file loaders."""
import sys
from pathlib import Path

import pytest

from qtransformers.data import build_tokenizer, default_data_config, vocab_size
from qtransformers.data.hf_tokenizers import (HFTokenizer, SentencePieceTokenizer, tokenizer_main,
                                              train_tokenizer)
from qtransformers.data.tokenizers import ByteTokenizer, WordTokenizer, split_words
from qtransformers.data.vocab import word_vocab_path

TEXT = 'The "while" statement repeats: x += 1  # ünïcode, 漢字 and emoji 🙂.'


def test_byte_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids + [tok.sep_id, tok.pad_id]) == TEXT
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (256, 257, 258, 259,
                                                                               260)
    assert tok.vocab_size == 261 and tok.special_ids == (256, 257, 258, 259, 260)


def test_word_tokenizer_counts_and_round_trip():
    texts = ["the cat sat on the mat .", "the dog sat <unk> ."]
    tok = WordTokenizer.build(texts, vocab_size=9)  # 5 specials + 4 words
    # counts: the 3, sat 2, . 2, then ties at 1 broken alphabetically: <unk> before cat.
    assert tok.words == ["the", ".", "sat", "<unk>"]
    assert tok.encode("the cat sat .") == [5, 1, 7, 6]  # cat -> [UNK] = 1
    assert tok.decode(tok.encode("the sat <unk> .")) == "the sat <unk> ."
    assert split_words("a,b <unk> c's") == ["a", ",", "b", "<unk>", "c", "'", "s"]
    assert tok.vocab_size == 9 and tok.special_ids == (0, 1, 2, 3, 4)


def test_word_vocab_is_deterministic_and_cached(tmp_path: Path):
    cfg = default_data_config()
    cfg.tokenizer, cfg.vocab_size = "word", 512
    first = build_tokenizer(cfg, workdir=tmp_path)
    path = word_vocab_path(cfg, tmp_path)
    assert path.is_file()
    again = build_tokenizer(cfg, workdir=tmp_path)  # loaded from the cache
    fresh = build_tokenizer(cfg)  # rebuilt without a workdir
    assert first.fingerprint() == again.fingerprint() == fresh.fingerprint()
    assert len(first.words) == 512 - 5 and first.words[:3] == ['"', ".", "the"]
    assert vocab_size(cfg) == 512
    cfg.vocab_size = 256  # another vocabulary gets another cache file
    assert word_vocab_path(cfg, tmp_path) != path


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_train_and_load_hf_tokenizer(tmp_path: Path, kind: str):
    out = train_tokenizer(["builtin"], kind=kind, vocab_size=400, out_path=tmp_path / "t.json")
    tok = HFTokenizer(out)
    assert tok.vocab_size == 400
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    text = 'The "while" statement repeats: x += 1'
    ids = tok.encode(text)
    assert 4 < len(ids) < len(text) and min(ids) >= 5  # no specials added
    assert tok.encode_lines([text, "pass"])[0] == ids
    if kind == "bpe":  # byte-level BPE decodes back exactly, even unseen characters
        assert tok.decode(tok.encode(TEXT)) == TEXT
    else:
        assert tok.decode(ids) == 'The " while " statement repeats : x + = 1'
    cfg = default_data_config()
    cfg.tokenizer = str(out)
    assert vocab_size(cfg) == 400


def test_tokenizer_cli(tmp_path: Path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one two three\nfour five six\n" * 50)
    assert tokenizer_main([str(corpus), "--kind", "bpe", "--vocab-size", "300", "--out",
                           str(tmp_path / "cli.json")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "cli.json").is_file()
    with pytest.raises(ValueError, match="kind='unigram' is unknown"):
        train_tokenizer([corpus], kind="unigram", out_path=tmp_path / "x.json")


def test_sentencepiece_missing_package_is_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        SentencePieceTokenizer(tmp_path / "m.model")


def test_sentencepiece_model(tmp_path: Path):
    spm = pytest.importorskip("sentencepiece", reason="optional package sentencepiece missing")
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                   vocab_size=33, user_defined_symbols=["[MASK]"], pad_id=3,
                                   minloglevel=2)
    tok = SentencePieceTokenizer(tmp_path / "m.model")
    assert (tok.unk_id, tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"


def test_unknown_tokenizer_and_mlm_needs_mask(tmp_path: Path):
    cfg = default_data_config()
    cfg.tokenizer = "gpt2"
    with pytest.raises(ValueError, match="data.tokenizer='gpt2' is unknown"):
        build_tokenizer(cfg)
    # A tokenizer without [MASK] cannot feed MLM: the error names the missing token.
    import tokenizers
    from tokenizers import models, pre_tokenizers

    hf = tokenizers.Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "w.json"))
    from qtransformers.data import make_train_iterator

    cfg.tokenizer, cfg.objective, cfg.add_cls_first, cfg.sep_at_line_breaks = (
        str(tmp_path / "w.json"), "mlm", False, False)
    with pytest.raises(ValueError, match="has no mask token, which objective='mlm' needs"):
        make_train_iterator(cfg, global_batch_size=2)
