"""Build the configured tokenizer; the 'word' vocabulary is built deterministically and cached.

Cache: <workdir>/tokenizer/word-<key>.json, key = hash of every field that changes the
vocabulary (source, paths, TFDS name / split, vocab_size, ... and the Python version for the
built-in corpus). Every process builds the same vocabulary, so a shared, a local or a remote
(gs://) workdir all work; the file is written atomically.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from collections.abc import Sequence

import ml_collections
from etils import epath

from qtransformers import fileio
from qtransformers.data.config import BUILTIN_TOKENIZERS, is_tokenizer_file
from qtransformers.data.corpus import local_lines
from qtransformers.data.hf_tokenizers import load_tokenizer_file
from qtransformers.data.sources import TFDSTexts
from qtransformers.data.tokenizers import ByteTokenizer, Tokenizer, WordTokenizer


def _vocab_key(cfg: ml_collections.ConfigDict) -> str:
    fields = {k: cfg[k] for k in ("source", "vocab_size")}
    if cfg.source == "builtin":
        fields["python"] = sys.version.split()[0]  # the manual's text changes between versions
    elif cfg.source == "wikipedia_summaries":
        fields["eval_fraction"] = cfg.eval_fraction
    elif cfg.source == "text":
        fields.update(path=str(Path(cfg.path).resolve()), eval_path=cfg.eval_path,
                      eval_fraction=cfg.eval_fraction)
    else:
        fields.update(tfds_name=cfg.tfds_name, tfds_split=cfg.tfds_split,
                      text_feature=cfg.text_feature, docs=cfg.word_vocab_max_documents)
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _vocab_texts(cfg: ml_collections.ConfigDict) -> Sequence[str]:
    if cfg.source == "tfds":
        docs = TFDSTexts(cfg, cfg.tfds_split)
        return [docs[i] for i in range(min(len(docs), cfg.word_vocab_max_documents))]
    return local_lines(cfg, "train")


def word_vocab_path(cfg: ml_collections.ConfigDict, workdir: str | Path) -> epath.Path:
    """Where the 'word' vocabulary of `cfg` is cached under `workdir` (local or gs://...)."""
    return epath.Path(workdir) / "tokenizer" / f"word-{_vocab_key(cfg)}.json"


def build_tokenizer(cfg: ml_collections.ConfigDict, workdir: str | Path | None = None
                    ) -> Tokenizer:
    """The tokenizer of `cfg.tokenizer`: 'byte', 'word' (built from the training text, cached
    under `workdir` when given), or a HuggingFace .json / SentencePiece .model file."""
    if cfg.objective == "image":
        raise ValueError("data.objective='image' has no tokenizer.")
    name = cfg.tokenizer
    if name == "byte":
        return ByteTokenizer()
    if name == "word":
        path = word_vocab_path(cfg, workdir) if workdir is not None else None
        if path is not None and fileio.isfile(path):
            return WordTokenizer.load(path)
        tok = WordTokenizer.build(_vocab_texts(cfg), cfg.vocab_size)
        if path is not None:
            tok.save(path)
        return tok
    if not is_tokenizer_file(name):
        raise ValueError(f"data.tokenizer={name!r} is unknown; use one of "
                         f"{', '.join(BUILTIN_TOKENIZERS)}, a .json or a .model file.")
    return load_tokenizer_file(name)


def vocab_size(cfg: ml_collections.ConfigDict, workdir: str | Path | None = None) -> int:
    """The model's vocabulary size for `cfg` (no corpus scan for 'byte' and 'word')."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer().vocab_size
    if cfg.tokenizer == "word":
        return int(cfg.vocab_size)
    return build_tokenizer(cfg, workdir).vocab_size
