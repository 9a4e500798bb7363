"""Tokenizers from files: HuggingFace `tokenizers` .json, SentencePiece .model, and training one.

`train_tokenizer` trains a WordPiece (BERT-style) or byte-level BPE (GPT-2 / OPT-style) tokenizer
with the HuggingFace `tokenizers` library on local text files and writes a .json that
`data.tokenizer=/path/to/tokenizer.json` loads. `tokenizer_main` is its command line.
"""
from __future__ import annotations

from pathlib import Path
from collections.abc import Iterator, Sequence

import numpy as np

from qtransformers.data.corpus import builtin_lines, read_lines
from qtransformers.data.tokenizers import SPECIAL_TOKENS, Tokenizer

# Candidate spellings of each special token, first match wins.
_SPECIAL_NAMES = {
    "pad_id": ("[PAD]", "<pad>"),
    "unk_id": ("[UNK]", "<unk>"),
    "cls_id": ("[CLS]", "<s>", "<bos>", "[BOS]", "<|endoftext|>"),
    "sep_id": ("[SEP]", "</s>", "<eos>", "[EOS]", "<|endoftext|>"),
    "mask_id": ("[MASK]", "<mask>"),
}
TRAIN_KINDS = ("wordpiece", "bpe")


class HFTokenizer(Tokenizer):
    """A HuggingFace `tokenizers` tokenizer loaded from its .json file.

    Special tokens are found by name (_SPECIAL_NAMES: BERT's [CLS]/[SEP]/..., RoBERTa / OPT's
    <s>/</s>/<pad>/<mask>, GPT-2's <|endoftext|>); without a pad token, EOS pads.
    """

    kind = "hf"

    def __init__(self, path: str | Path) -> None:
        import tokenizers  # the HuggingFace library (this module is qtransformers.data.*)

        if not Path(path).is_file():
            raise FileNotFoundError(f"data.tokenizer={str(path)!r}: no such tokenizer .json file.")
        self.path = str(path)
        self._tok = tokenizers.Tokenizer.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        for field, names in _SPECIAL_NAMES.items():
            ids = [self._tok.token_to_id(n) for n in names]
            setattr(self, field, next((i for i in ids if i is not None), None))
        if self.pad_id is None:  # GPT-2 style vocabularies: pad with EOS (padding has weight 0)
            self.pad_id = self.sep_id

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without the post-processor's special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        """Batched `encode` (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(lines), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids` (shape (T,)), special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model (needs the optional `sentencepiece` package).

    pad / unk / bos (= cls) / eos (= sep) come from the model's own ids (pad falls back to eos);
    mask is the piece '[MASK]' or '<mask>' when the model defines one (user_defined_symbols).
    """

    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(f"data.tokenizer={str(path)!r} is a SentencePiece model, which needs "
                              "the optional package: pip install sentencepiece") from e
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.tokenizer={str(path)!r}: no such .model file.")
        self.path = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self._sp.get_piece_size()
        valid = lambda i: i if 0 <= i < self.vocab_size else None
        self.pad_id, self.unk_id = valid(self._sp.pad_id()), valid(self._sp.unk_id())
        self.cls_id, self.sep_id = valid(self._sp.bos_id()), valid(self._sp.eos_id())
        if self.pad_id is None:  # SentencePiece has no pad by default: pad with EOS (weight 0)
            self.pad_id = self.sep_id
        self.mask_id = None
        for piece in _SPECIAL_NAMES["mask_id"]:
            i = self._sp.piece_to_id(piece)
            if i != self._sp.unk_id() and self._sp.id_to_piece(i) == piece:
                self.mask_id = i
                break

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text` (no BOS / EOS)."""
        return self._sp.encode(text, out_type=int)

    def encode_lines(self, lines: Sequence[str]) -> list[list[int]]:
        """Batched `encode`."""
        return self._sp.encode(list(lines), out_type=int)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids` (shape (T,)); control pieces decode to ''."""
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """A HuggingFace .json or SentencePiece .model tokenizer by its file name."""
    if str(path).endswith(".model"):
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)


def _iter_training_lines(files: Sequence[str | Path]) -> Iterator[str]:
    for f in files:
        if str(f) == "builtin":
            yield from builtin_lines("train")
        else:
            yield from read_lines(f)


def train_tokenizer(files: Sequence[str | Path], kind: str = "wordpiece", vocab_size: int = 8192,
                    out_path: str | Path = "tokenizer.json", min_frequency: int = 2) -> Path:
    """Train a tokenizer on text files and save it as a HuggingFace .json.

    Args:
      files: .txt files, folders (searched recursively for *.txt) or the word 'builtin' (the
        built-in corpus' training split).
      kind: 'wordpiece' (BERT: BERT normaliser without lowercasing, BERT pre-tokenizer, '##'
        continuations) or 'bpe' (byte-level BPE as GPT-2 / OPT: every string is encodable and
        decodes back exactly).
      vocab_size: vocabulary size including the specials [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4).
      out_path: where to write the .json.
      min_frequency: pairs / pieces seen fewer times are not merged.
    Returns:
      The written path.
    """
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    if kind not in TRAIN_KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {', '.join(TRAIN_KINDS)}.")
    if not files:
        raise ValueError("files is empty; give .txt files, folders or 'builtin'.")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} specials.")
    specials = list(SPECIAL_TOKENS)
    if kind == "wordpiece":
        tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                            min_frequency=min_frequency, show_progress=False)
    else:
        tok = tokenizers.Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      min_frequency=min_frequency, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_iter_training_lines(files), trainer=trainer)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


TOKENIZER_USAGE = ("usage: qtransformers tokenizer FILE_OR_FOLDER... [--kind wordpiece|bpe] "
                   "[--vocab_size 8192] [--min_frequency 2] [--out tokenizer.json]\n\n"
                   "Train a WordPiece or byte-level BPE tokenizer on .txt files, folders of "
                   "them, or 'builtin' (the built-in corpus).")


def _tokenizer_flags() -> "flags.FlagValues":
    from absl import flags
    f = flags.FlagValues()
    flags.DEFINE_enum("kind", "wordpiece", TRAIN_KINDS, "wordpiece (BERT) or bpe (byte-level, "
                      "GPT-2 / OPT)", flag_values=f)
    flags.DEFINE_integer("vocab_size", 8192, "vocabulary size including the 5 specials",
                         flag_values=f)
    flags.DEFINE_integer("min_frequency", 2, "pairs / pieces seen fewer times are not merged",
                         lower_bound=1, flag_values=f)
    flags.DEFINE_string("out", "tokenizer.json", "output .json path", flag_values=f)
    return f


def _check_inputs(files: Sequence[str], out: str) -> None:
    """Raises UserError for a missing, empty or binary input, or an --out that is a folder."""
    import os

    from qtransformers.commandline import UserError
    from qtransformers.data.corpus import count_text_lines
    if not files:
        raise UserError("no input files; give .txt files, folders of them, or 'builtin' "
                        "(see --help).")
    for f in files:
        if f == "builtin":
            continue
        if not Path(f).exists():
            raise UserError(f"input {f!r} does not exist; give .txt files, folders of them, or "
                            "'builtin'.")
        try:
            if count_text_lines(f, "input", 1) == 0:
                raise UserError(f"input {f!r} is empty (no non-blank line); give text to train "
                                "on.")
        except FileNotFoundError as err:  # a folder without *.txt
            raise UserError(str(err).replace("data.path", "input")) from err
        except UserError:
            raise
        except ValueError as err:  # binary
            raise UserError(str(err)) from err
    if os.path.isdir(out):
        raise UserError(f"--out={out} is a folder; give the .json file to write, e.g. "
                        f"{os.path.join(out, 'tokenizer.json')}.")


def _underscored(arg: str) -> str:
    """'--vocab-size=8' -> '--vocab_size=8' (the argparse spelling); other arguments unchanged."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return f"--{name.replace('-', '_')}{sep}{value}"


def tokenizer_main(argv: Sequence[str] | None = None) -> int:
    """Command line for `train_tokenizer`: `... FILES --kind bpe --vocab_size 8192 --out t.json`.

    argv: the arguments after `tokenizer` (default sys.argv[1:]). The argparse spellings
    --vocab-size / --min-frequency still work. Returns 0, or 2 after one line on stderr.
    """
    import sys

    from qtransformers.commandline import run_command
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command("qtransformers tokenizer", _tokenizer, ["qtransformers tokenizer", *argv])


def _tokenizer(argv: list[str]) -> int:
    from qtransformers.commandline import UserError, parse_flags
    argv = [_underscored(a) for a in argv]
    flag_values = _tokenizer_flags()
    files = parse_flags(flag_values, argv, TOKENIZER_USAGE)[1:]
    if flag_values.vocab_size <= len(SPECIAL_TOKENS):
        raise UserError(f"--vocab_size={flag_values.vocab_size} must exceed the "
                        f"{len(SPECIAL_TOKENS)} special tokens.")
    _check_inputs(files, flag_values.out)
    out = train_tokenizer(files, flag_values.kind, flag_values.vocab_size, flag_values.out,
                          flag_values.min_frequency)
    tok = HFTokenizer(out)
    print(f"wrote {out} ({flag_values.kind}, vocab_size={tok.vocab_size}); use it with "
          f"--config.data.tokenizer={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(tokenizer_main())
