"""The embedding task: retrieval metrics against a brute-force NumPy computation, length
batching that restores text order, and FP / quantized embeddings of a small random encoder."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from qtransformers.convert import EncoderTokenizer
from qtransformers.evaluate.embedding import (BUCKETS, EmbeddingTask, cosine_agreement,
                                              length_batches, retrieval_metrics)
from qtransformers.models import ModelConfig, build_model
from qtransformers.quant import QuantConfig

WORDS = ("the a of and to in is was he she it city river king war film born capital france "
         "paris music band album song team game played first second year world").split()


def _brute_force(q: np.ndarray, d: np.ndarray) -> dict[str, float]:
    n = len(q)
    ranks = []
    for i in range(n):
        cos = [float(np.dot(q[i], d[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(d[j])))
               for j in range(n)]
        ranks.append(1 + sum(c > cos[i] for c in cos))
    ranks = np.asarray(ranks)
    return {"recall@1": np.mean(ranks <= 1), "recall@10": np.mean(ranks <= 10),
            "mrr": np.mean(1 / ranks)}


def test_retrieval_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((60, 8)).astype(np.float32)
    q = d + rng.standard_normal((60, 8)).astype(np.float32) * 1.5  # some right, some wrong
    q[5] = d[7] * 3.0  # query 5 finds document 7 first
    got = retrieval_metrics(q, d)
    want = _brute_force(q, d)
    assert got["num_articles"] == 60
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert 0.0 < got["recall@1"] < 1.0 and got["recall@1"] <= got["recall@10"]


def test_cosine_agreement():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((30, 5))
    b = a + rng.standard_normal((30, 5)) * 0.3
    cos = np.array([np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    got = cosine_agreement(a, b)
    assert got["mean"] == pytest.approx(cos.mean()) and got["min"] == pytest.approx(cos.min())
    assert got["p5"] == pytest.approx(np.percentile(cos, 5))


def test_length_batches_cover_every_text_once():
    rng = np.random.default_rng(2)
    ids = [np.arange(n, dtype=np.int32) + 5 for n in rng.integers(3, 70, 37)]
    batches = length_batches(ids, 8, 0, 64)
    seen = np.concatenate([idx[idx >= 0] for idx, _ in batches])
    assert sorted(seen) == list(range(37))
    for idx, b in batches:
        assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] in BUCKETS + (64,)
        for r, i in enumerate(idx):
            if i >= 0:
                n = min(len(ids[i]), b["input_ids"].shape[1])
                assert b["attention_mask"][r].sum() == n
                np.testing.assert_array_equal(b["input_ids"][r, :n], ids[i][:n])


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    folder = Path(tmp_path_factory.mktemp("vocab"))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + letters + WORDS
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tok = EncoderTokenizer(folder / "vocab.txt", max_length=16)  # one bucket: one compile
    rng = np.random.default_rng(3)
    sentence = lambda n: " ".join(rng.choice(WORDS, n)) + "."  # noqa: E731
    queries = [sentence(int(n)) for n in rng.integers(3, 9, 12)]
    docs = [q + " " + sentence(int(n)) for q, n in zip(queries, rng.integers(4, 30, 12))]
    calib = [sentence(int(n)) for n in rng.integers(3, 20, 40)]
    task = EmbeddingTask([f"t{i}" for i in range(12)], queries, docs, calib, tok, batch_size=8)
    config = ModelConfig(vocab_size=len(tokens), d_model=32, num_layers=1, num_heads=4, d_ff=64,
                         max_len=32, pooling="mean", normalize_embeddings=True)
    model = build_model(config)
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    return task, model, params


def test_embeddings_follow_text_order(tiny_task):
    task, model, params = tiny_task
    emb = task.embed(model, params)
    for texts, key in ((task.queries, "queries"), (task.documents, "documents")):
        b = task.tokenizer.batch([texts[i] for i in (0, 5, 11)])
        direct = model.apply({"params": params}, b["input_ids"], b["attention_mask"])
        np.testing.assert_allclose(emb[key][[0, 5, 11]], np.asarray(direct), atol=1e-5)


@pytest.mark.slow
def test_quantized_embeddings_approach_fp_with_more_bits(tiny_task):
    task, model, params = tiny_task
    fp = task.embed(model, params)
    cos = {}
    for bits, gran in ((16, "per_tensor"), (4, "per_tensor")):  # per-token: the report test
        config = QuantConfig(weight_bits=bits, act_bits=bits, act_granularity=gran,
                             num_calibration_batches=2, calibration_batch_size=8)
        result = task.evaluate_config(model, params, config, fp=fp)
        cos[bits, gran] = result["cosine"]["mean"]
        assert set(result["metrics"]) >= {"recall@1", "recall@10", "mrr"}
    assert cos[16, "per_tensor"] > 0.9999
    assert cos[4, "per_tensor"] < 0.999


@pytest.mark.slow
def test_quantizability_report_files_and_numbers(tiny_task, tmp_path):
    from qtransformers.evaluate.quantizability import (capture, quantizability_report,
                                                       write_report)
    task, model, params = tiny_task
    config = QuantConfig(num_calibration_batches=1, calibration_batch_size=8)
    report = quantizability_report(task, model, params, config, probe_batches=2, sweep=(),
                                   log=lambda _: None)
    labels = [m["config"] for m in report["metrics"]]
    assert labels == ["FP", "W8A8 per-tensor", "W8A8 per-token"]
    assert 0.99 < report["metrics"][2]["cos mean"] <= 1.0 + 1e-6  # per-token: small error
    worst = max(report["sites"], key=lambda r: r["max |x|"] if "scores" not in r["site"]
                and "probs" not in r["site"] else 0)
    acts = [(capture(model, params, b, [worst["path"]])[worst["path"]], b["attention_mask"])
            for _, b in task.inputs()[:2]]
    direct = max(float(np.abs(a[m.astype(bool)]).max()) for a, m in acts)
    assert worst["max |x|"] == pytest.approx(direct, rel=1e-5)
    kinds = [r["quantized"] for r in report["sensitivity"]]
    assert kinds[:2] == ["weights only", "activations only"] and "kind mlp_residual" in kinds
    files = write_report(report, str(tmp_path / "rep"), title="tiny")
    for name in ("report.md", "report.json", "outliers_per_layer.png",
                 "channel_token_heatmap.png", "metric_vs_bits.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    assert len(files) == 5
