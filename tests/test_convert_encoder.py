"""Sentence-encoder import: small random HF BertModel and sentence-transformers folders (mean,
CLS, max pooling; Normalize) give the same last hidden state (1e-5) and the same pooled
embedding as HuggingFace / sentence-transformers; unsupported folders are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qtransformers.convert import EncoderTokenizer, describe_encoder_folder, load_encoder  # noqa
from qtransformers.models import build_model  # noqa: E402

ATOL = 1e-5
WORDS = ("the a of and to in is was he she it city river king war film born capital france "
         "paris music band album song team game played first second year world new old red "
         "blue green large small north south east west people house language").split()
TEXTS = ["The city of Paris is the capital of France.", "He was born in the north.",
         "A red house", "The band played a new song in the first year of the war and the king "
         "of the south was in the city."]


def write_vocab(folder: Path) -> Path:
    """A WordPiece vocab of specials, letters, '##' letters and a few words."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + letters
              + ["##" + c for c in letters] + WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return folder / "vocab.txt"


def random_bert_folder(folder: Path, seed: int = 0) -> Path:
    """A saved random BertModel (2 layers, d 32) with a fast tokenizer; random LayerNorm too."""
    vocab = write_vocab(folder)
    n_vocab = len(vocab.read_text().split())
    config = transformers.BertConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37,
                                     max_position_embeddings=64, attn_implementation="eager")
    model = transformers.BertModel(config, add_pooling_layer=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(noise + 1.0 if "LayerNorm.weight" in name else noise)
    model.eval().save_pretrained(folder)
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return random_bert_folder(tmp_path_factory.mktemp("bert"))


def _encode(folder: Path, texts=TEXTS, **overrides):
    config, params, info = load_encoder(folder, **overrides)
    tok = EncoderTokenizer.from_folder(info)
    batch = tok.batch(texts)
    model = build_model(config)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return (np.asarray(model.apply({"params": params}, *args)),
            np.asarray(model.apply({"params": params}, *args, return_hidden=True)), batch)


def test_bert_model_last_hidden_state_matches_hf(bert_folder):
    emb, hidden, batch = _encode(bert_folder)
    hf = transformers.BertModel.from_pretrained(bert_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch["input_ids"]).long(),
                 attention_mask=torch.tensor(batch["attention_mask"]).long()).last_hidden_state
    ref = ref.numpy()
    assert batch["attention_mask"].min() == 0  # padding is exercised
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[real], ref[real], atol=ATOL, rtol=0)
    # A plain HF folder is mean-pooled, not normalised (sentence-transformers' default).
    mask = batch["attention_mask"][..., None]
    np.testing.assert_allclose(emb, (ref * mask).sum(1) / mask.sum(1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_sentence_transformers_folder_matches(bert_folder, tmp_path, pooling, normalize):
    st = pytest.importorskip("sentence_transformers")
    try:  # sentence-transformers >= 6 moved the modules
        from sentence_transformers.sentence_transformer import modules as st_modules
    except ImportError:
        from sentence_transformers import models as st_modules
    modules = [st_modules.Transformer(str(bert_folder), max_seq_length=24),
               st_modules.Pooling(32, pooling_mode=pooling)]
    if normalize:
        modules.append(st_modules.Normalize())
    model = st.SentenceTransformer(modules=modules, device="cpu")
    model.save(str(tmp_path / "st"))
    info = describe_encoder_folder(tmp_path / "st")
    assert (info.kind, info.pooling, info.normalize, info.max_seq_length) == (
        "sentence-transformers", pooling, normalize, 24)
    ref = model.encode(TEXTS, convert_to_numpy=True)
    emb, _, batch = _encode(tmp_path / "st")
    assert batch["input_ids"].shape[1] == 24  # the long text is truncated like theirs
    np.testing.assert_allclose(emb, ref, atol=ATOL, rtol=0)


def test_masked_lm_folder_loads_as_encoder_without_its_head(tmp_path):
    folder = random_bert_folder(tmp_path / "src", seed=1)
    hf = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    hf.save_pretrained(tmp_path / "mlm")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(
        tmp_path / "mlm")
    _, hidden, batch = _encode(tmp_path / "mlm")
    with torch.no_grad():
        ref = hf.bert(input_ids=torch.tensor(batch["input_ids"]).long(),
                      attention_mask=torch.tensor(batch["attention_mask"]).long())[0].numpy()
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[real], ref[real], atol=ATOL, rtol=0)


def _st_folder(tmp_path: Path, pooling: dict, types=("Transformer", "Pooling")) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir(parents=True)
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Dense": "2_Dense"}
    modules = [{"idx": i, "name": str(i), "path": paths[t],
                "type": f"sentence_transformers.models.{t}"} for i, t in enumerate(types)]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


def test_unsupported_folders_are_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a sentence-transformers"):
        describe_encoder_folder(tmp_path / "plain")
    with pytest.raises(ValueError, match="mean_sqrt_len"):
        describe_encoder_folder(_st_folder(tmp_path, {"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ValueError, match="Dense"):
        describe_encoder_folder(_st_folder(tmp_path / "d", {"pooling_mode_mean_tokens": True},
                                           ("Transformer", "Pooling", "Dense")))
    opt = tmp_path / "opt"
    opt.mkdir()
    (opt / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(ValueError, match="model_type='opt' is not supported"):
        load_encoder(opt)
