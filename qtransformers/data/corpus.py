"""Text that lives on this machine: the built-in corpus and local .txt files, as lists of lines.

Built-in corpus: `pydoc_data.topics`, the help topics of the Python Language Reference that every
CPython ships (`help('while')` prints them; ~465 KB of English prose and code in 79 topics, PSF
license). It is the default corpus because it needs no download, no network and no file of ours,
so a fresh machine can train out of the box, and it is identical wherever the same Python runs.
Topics are sorted by name; the last topics that together hold >= 10% of the characters are held
out for validation (8 topics, `typesmethods` .. `yield`, on Python 3.11), so no topic is in both
splits and the validation text is large enough for a stable perplexity. Each topic's blank-line
separated paragraphs are re-joined into one line (the manual wraps at 70 columns, so a raw line
break carries no meaning), runs of spaces become one, and reST underlines and table borders
(`*****`, `+----+`) are dropped: a line is then a paragraph, like a line of WikiText.

Local text: a file, or a folder searched recursively for *.txt (sorted paths), read as UTF-8;
blank lines are dropped, leading and trailing whitespace is stripped.
"""
from __future__ import annotations

import re
from pathlib import Path

import ml_collections

# reST underlines and table borders: lines of only these characters (at least three).
_RULE = re.compile(r"^[\s+|]*[*=\-~^#][*=\-~^#+|\s]{2,}$")
VALIDATION_FRACTION = 0.1


def _paragraphs(text: str) -> list[str]:
    """Split reference-manual text into paragraphs, each joined onto one line."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines() if not _RULE.match(ln)]
        para = " ".join(" ".join(ln for ln in lines).split())  # runs of spaces -> one
        if para:
            out.append(para)
    return out


def builtin_lines(split: str) -> list[str]:
    """Lines (paragraphs) of the built-in corpus for split 'train' or 'validation'."""
    if split not in ("train", "validation"):
        raise ValueError(f"builtin corpus split={split!r} is unknown; use 'train' or 'validation'.")
    from pydoc_data import topics  # part of CPython's standard library

    names = sorted(topics.topics)
    total = sum(len(topics.topics[n]) for n in names)
    n_train, held = len(names), 0
    while held < VALIDATION_FRACTION * total:
        n_train -= 1
        held += len(topics.topics[names[n_train]])
    chosen = names[:n_train] if split == "train" else names[n_train:]
    return [para for name in chosen for para in _paragraphs(topics.topics[name])]


def text_files(path: str | Path) -> list[Path]:
    """The file at `path`, or every *.txt under the folder `path` (recursive, sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise FileNotFoundError(f"data.path={str(path)!r} is a folder without *.txt files; "
                                    "point it at a .txt file or a folder that holds some.")
        return files
    raise FileNotFoundError(f"data.path={str(path)!r} does not exist; give a .txt file or a "
                            "folder of .txt files.")


_SNIFF_BYTES = 8192


def _binary_reason(head: bytes) -> str | None:
    """Why the first bytes of a file are not UTF-8 text (NUL bytes, invalid UTF-8), or None."""
    if b"\0" in head:
        return "holds NUL bytes"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the sniff boundary
            return f"is not UTF-8 (byte {err.start} = 0x{head[err.start]:02x})"
    return None


def count_text_lines(path: str | Path, label: str, at_most: int) -> int:
    """Non-blank lines of the text at `path` (file or folder of *.txt), counting stops at
    `at_most`; raises ValueError naming `label` (e.g. 'data.path') and the file when a file is
    binary.

    Reads only the start of each file for the binary check and stops at `at_most` lines, so it
    is cheap on a large corpus.
    """
    count = 0
    for f in text_files(path):
        with open(f, "rb") as fh:
            reason = _binary_reason(fh.read(_SNIFF_BYTES))
        if reason:
            raise ValueError(f"{label}={str(path)!r}: {str(f)!r} {reason}, so it is not a "
                             f"text file; point {label} at UTF-8 .txt files.")
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    count += 1
                    if count >= at_most:
                        return count
    return count


def check_text_source(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field and path when local text (source='text') is not text,
    is empty or blank, or leaves an empty evaluation split."""
    train_lines = count_text_lines(cfg.path, "data.path", 2)
    if train_lines == 0:
        raise ValueError(f"data.path={cfg.path!r} is empty (no non-blank line); give a .txt file "
                         "or folder of .txt files with text in it.")
    if cfg.eval_path:
        if count_text_lines(cfg.eval_path, "data.eval_path", 1) == 0:
            raise ValueError(f"data.eval_path={cfg.eval_path!r} is empty (no non-blank line), so "
                             "the evaluation split would be empty; give a file with text, or set "
                             "data.eval_path='' to hold out data.eval_fraction of data.path.")
    elif train_lines < 2:
        raise ValueError(f"data.path={cfg.path!r} has 1 non-blank line; holding out an evaluation "
                         "split needs >= 2 (or set data.eval_path).")


def read_lines(path: str | Path) -> list[str]:
    """Non-blank, stripped lines of a text file or of every *.txt in a folder, in sorted order."""
    lines: list[str] = []
    for f in text_files(path):
        with open(f, encoding="utf-8", errors="replace") as fh:
            lines.extend(s for s in (ln.strip() for ln in fh) if s)
    return lines


def local_lines(cfg: ml_collections.ConfigDict, split: str) -> list[str]:
    """Lines of source 'builtin', 'text' or 'wikipedia_summaries' for split 'train' or 'eval'.

    For 'text' without eval_path, the last `eval_fraction` of the lines (at least one) are the
    evaluation split and the rest the training split.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is unknown; use 'train' or 'eval'.")
    if cfg.source == "builtin":
        return builtin_lines("train" if split == "train" else "validation")
    if cfg.source == "wikipedia_summaries":
        from qtransformers.data.wikipedia import summary_lines
        return summary_lines(split, cfg.eval_fraction)
    if cfg.source != "text":
        raise ValueError(f"data.source={cfg.source!r} is not a local text source.")
    if cfg.eval_path:
        return read_lines(cfg.path if split == "train" else cfg.eval_path)
    lines = read_lines(cfg.path)
    if len(lines) < 2:
        raise ValueError(f"data.path={cfg.path!r} has {len(lines)} non-blank line(s); holding "
                         "out an evaluation split needs >= 2 (or set data.eval_path).")
    n_eval = min(len(lines) - 1, max(1, round(len(lines) * cfg.eval_fraction)))
    return lines[:-n_eval] if split == "train" else lines[-n_eval:]
