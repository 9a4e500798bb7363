"""Sentence encoders from disk: a sentence-transformers folder or a HuggingFace BertModel folder.

    config, params, folder = load_encoder("path/to/all-MiniLM-L6-v2")
    tokenizer = EncoderTokenizer.from_folder(folder)
    emb = build_model(config).apply({"params": params}, **tokenizer.batch(["a sentence"]))

A sentence-transformers folder has `modules.json` listing its modules in order: a
`Transformer` (the HF model, in the folder named by its `path`, usually the root), a `Pooling`
(`<path>/config.json`: pooling_mode_{cls_token, mean_tokens, max_tokens}, exactly one true, or
since sentence-transformers 6 pooling_mode 'mean' | 'cls' | 'max') and optionally a `Normalize`
(L2 normalisation); max_seq_length comes from `sentence_bert_config.json` (or, since 6, the
tokenizer's model_max_length).
Other modules (Dense, LayerNorm, ...) and other pooling modes (mean_sqrt_len, weightedmean,
lasttoken, several at once) are refused with a ValueError naming them.

A plain HF folder (config.json with model_type 'bert': BertModel, or BertForMaskedLM whose head is
dropped) is pooled as sentence-transformers pools a plain HF model: mean over real tokens, not
normalised, max_seq_length = the position table (512).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qtransformers.convert.hf_config import config_from_hf
from qtransformers.convert.hf_load import read_hf_folder
from qtransformers.convert.hf_params import params_from_hf_state_dict
from qtransformers.models.config import POOLINGS, ModelConfig

ST_TYPES = ("Transformer", "Pooling", "Normalize")
# sentence-transformers pooling flags -> our pooling names; the others are refused when set.
POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max"}
UNSUPPORTED_POOLING_FLAGS = ("pooling_mode_mean_sqrt_len_tokens",
                             "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
ENCODER_MODEL_TYPES = ("bert",)


@dataclasses.dataclass(frozen=True)
class EncoderFolder:
    """What a sentence-encoder folder holds (see the module docstring).

    kind: 'sentence-transformers' or 'hf'; root: the folder given; transformer_dir: where the
    HF config.json / weights / tokenizer live; pooling: 'mean' | 'cls' | 'max'; normalize: L2
    normalisation; max_seq_length: tokens per text incl. [CLS] / [SEP].
    """

    kind: str
    root: Path
    transformer_dir: Path
    pooling: str
    normalize: bool
    max_seq_length: int


def folder_kind(folder: str | Path) -> str | None:
    """'sentence-transformers' (modules.json), 'hf' (config.json with model_type) or None."""
    folder = Path(folder)
    if (folder / "modules.json").is_file():
        return "sentence-transformers"
    config = folder / "config.json"
    if config.is_file():
        try:
            if "model_type" in json.loads(config.read_text()):
                return "hf"
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing.") from None
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None


def pooling_from_config(config: dict[str, Any], where: str = "the pooling config") -> str:
    """'mean' | 'cls' | 'max' from a sentence-transformers Pooling config.json dict."""
    if isinstance(config.get("pooling_mode"), str):  # some versions store the name directly
        name = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(
            config["pooling_mode"], config["pooling_mode"])
        if name not in POOLINGS:
            raise ValueError(f"{where}: pooling_mode={config['pooling_mode']!r} is not supported; "
                             f"supported: {POOLINGS}.")
        return name
    bad = [f for f in UNSUPPORTED_POOLING_FLAGS if config.get(f)]
    chosen = [name for flag, name in POOLING_FLAGS.items() if config.get(flag)]
    if bad or len(chosen) != 1:
        raise ValueError(f"{where}: exactly one of {tuple(POOLING_FLAGS)} must be true and none "
                         f"of {UNSUPPORTED_POOLING_FLAGS} (got {chosen + bad or 'none'}); "
                         "concatenated or other pooling modes are not supported.")
    return chosen[0]


def describe_encoder_folder(folder: str | Path) -> EncoderFolder:
    """Reads modules.json / the pooling config / sentence_bert_config.json of a folder.

    Raises:
      FileNotFoundError: the folder does not exist or is neither a sentence-transformers
        folder (modules.json) nor a HF model folder (config.json with model_type).
      ValueError: a module type or pooling mode we do not support.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder.")
    kind = folder_kind(root)
    if kind is None:
        raise FileNotFoundError(f"{root} is neither a sentence-transformers folder (modules.json) "
                                "nor a HuggingFace model folder (config.json with model_type).")
    if kind == "hf":
        hf = _read_json(root / "config.json")
        return EncoderFolder("hf", root, root, "mean", False,
                             int(hf.get("max_position_embeddings", 512)))
    modules = _read_json(root / "modules.json")
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{root / 'modules.json'} must be a non-empty list of modules.")
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = [m.get("type") for m, t in zip(modules, types) if t not in ST_TYPES]
    if unsupported or types[0] != "Transformer" or types.count("Pooling") != 1:
        raise ValueError(f"{root / 'modules.json'}: supported are a Transformer, one Pooling and "
                         f"an optional Normalize module, in that order; got {types}"
                         + (f" (unsupported: {unsupported})" if unsupported else "") + ".")
    transformer_dir = root / modules[0].get("path", "")
    pooling_dir = root / modules[types.index("Pooling")].get("path", "")
    pooling = pooling_from_config(_read_json(pooling_dir / "config.json"),
                                  str(pooling_dir / "config.json"))
    return EncoderFolder("sentence-transformers", root, transformer_dir, pooling,
                         "Normalize" in types, _max_seq_length(transformer_dir))


def _max_seq_length(transformer_dir: Path) -> int:
    """sentence_bert_config.json's max_seq_length (sentence-transformers < 6), else the
    tokenizer's model_max_length (>= 6 stores it there), capped by the position table."""
    positions = int(_read_json(transformer_dir / "config.json").get("max_position_embeddings",
                                                                    512))
    for name, key in (("sentence_bert_config.json", "max_seq_length"),
                      ("tokenizer_config.json", "model_max_length")):
        path = transformer_dir / name
        value = _read_json(path).get(key) if path.is_file() else None
        if isinstance(value, int) and 0 < value < 10**6:
            return min(value, positions)
    return positions


def load_encoder(folder: str | Path, **overrides: Any) -> tuple[ModelConfig, Any, EncoderFolder]:
    """(ModelConfig with pooling set, params, EncoderFolder) of a sentence-encoder folder.

    overrides: ModelConfig fields, e.g. pooling='cls' to pool differently than the folder says.
    Raises FileNotFoundError / ValueError (see describe_encoder_folder, load_hf).
    """
    info = describe_encoder_folder(folder)
    model_type = _read_json(info.transformer_dir / "config.json").get("model_type")
    if model_type not in ENCODER_MODEL_TYPES:
        raise ValueError(f"{info.transformer_dir / 'config.json'}: model_type={model_type!r} is "
                         f"not supported as a sentence encoder; supported: {ENCODER_MODEL_TYPES}.")
    state_dict, hf_config = read_hf_folder(info.transformer_dir)
    values = dict(pooling=info.pooling, normalize_embeddings=info.normalize,
                  dropout_rate=0.0, attention_dropout_rate=0.0)
    values.update(overrides)
    config = config_from_hf(hf_config, "bert", **values)
    return config, params_from_hf_state_dict(state_dict, config), info


class EncoderTokenizer:
    """The folder's WordPiece tokenizer with BERT's [CLS] ... [SEP] and truncation.

    Reads tokenizer.json (HF fast tokenizer) or, failing that, vocab.txt (+ do_lower_case from
    tokenizer_config.json). Any truncation / padding stored in tokenizer.json is replaced by
    truncation to `max_length` and no padding (batch() pads).
    """

    def __init__(self, path: str | Path, max_length: int, lowercase: bool = True) -> None:
        import tokenizers

        path = Path(path)
        if path.suffix == ".json":
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        else:
            from tokenizers.implementations import BertWordPieceTokenizer
            self._tok = BertWordPieceTokenizer(str(path), lowercase=lowercase)
        self.max_length = int(max_length)
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=self.max_length)
        self.pad_id = self._tok.token_to_id("[PAD]") or 0
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, info: EncoderFolder, max_length: int | None = None) -> "EncoderTokenizer":
        """The tokenizer of an encoder folder; max_length defaults to its max_seq_length."""
        d = info.transformer_dir
        length = min(max_length or info.max_seq_length, info.max_seq_length)
        if (d / "tokenizer.json").is_file():
            return cls(d / "tokenizer.json", length)
        if (d / "vocab.txt").is_file():
            lower = True
            if (d / "tokenizer_config.json").is_file():
                lower = bool(_read_json(d / "tokenizer_config.json").get("do_lower_case", True))
            return cls(d / "vocab.txt", length, lowercase=lower)
        raise FileNotFoundError(f"{d} has no tokenizer.json or vocab.txt.")

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """int32 ids of each text: [CLS] tokens [SEP], at most max_length."""
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts))]

    def id_to_token(self, i: int) -> str:
        """The vocabulary string of id i."""
        return self._tok.id_to_token(int(i)) or f"<{int(i)}>"

    def batch(self, texts: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
        """{'input_ids', 'attention_mask', 'token_type_ids'} (B, L) int32, right-padded to
        `length` (default the longest text)."""
        return pad_ids(self.encode(texts), self.pad_id, length)


def pad_ids(ids: Sequence[np.ndarray], pad_id: int, length: int | None = None
            ) -> dict[str, np.ndarray]:
    """Right-pads id arrays into {'input_ids', 'attention_mask', 'token_type_ids'} (B, L)."""
    length = length or max(len(x) for x in ids)
    out = np.full((len(ids), length), pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for i, x in enumerate(ids):
        out[i, :len(x)] = x[:length]
        mask[i, :len(x)] = 1
    return {"input_ids": out, "attention_mask": mask, "token_type_ids": np.zeros_like(out)}
