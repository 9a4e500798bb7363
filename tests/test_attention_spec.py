"""AttentionSpec end to end: γ = −α/T in the probabilities the model computes (T = data.seq_len,
built as the CLI builds it), the old flat config keys, parameter names and run fingerprints."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from qtransformers import AttentionSpec, ModelConfig, build_model, get_model_config
from qtransformers.train import run_identity
from qtransformers.train.config import load_config_file, model_config_from, validate_config
from qtransformers.train.main import parse_args


def cli_model_config(*overrides):
    """The ModelConfig `qtransformers train --config configs/tiny_opt.py:clipped ...` trains."""
    config, _ = parse_args(["qtransformers train", "--config=configs/tiny_opt.py:clipped",
                            *overrides, "--workdir=/tmp/unused"])
    return validate_config(config), config.data.seq_len


def captured_attention(cfg, seq_len, batch=2):
    """{layer path: (scores, probs)} of every layer: (B, H, T, T) each, as the model computed."""
    model = build_model(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len), 0, cfg.vocab_size)
    params = model.init(jax.random.PRNGKey(1), ids)["params"]
    _, state = model.apply({"params": params}, ids, capture_intermediates=lambda m, _: m.name in (
        "scores", "probs"), mutable=["intermediates"])
    found = {}
    for path, value in jax.tree_util.tree_leaves_with_path(state["intermediates"]):
        keys = [p.key for p in path if hasattr(p, "key")]
        if keys[-1] == "__call__" and keys[-2] in ("scores", "probs"):
            found.setdefault("/".join(keys[:-2]), {})[keys[-2]] = np.asarray(value, np.float64)
    return {k: (v["scores"], v["probs"]) for k, v in found.items()}


def check_clipped_probs(cfg, seq_len, gamma):
    """The model's probabilities equal clip((ζ−γ)·softmax(scores) + γ, 0, 1) under the causal
    mask, are exactly 0 below −γ/(ζ−γ), and γ fitted from them equals `gamma`."""
    layers = captured_attention(cfg, seq_len)
    assert len(layers) == cfg.num_layers
    causal = np.tril(np.ones((seq_len, seq_len), bool))
    threshold = -gamma / (1.0 - gamma)
    for scores, probs in layers.values():
        logits = np.where(causal, scores, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(probs, np.clip((1.0 - gamma) * p + gamma, 0, 1), atol=2e-6)
        assert np.all(probs[p < threshold * (1 - 1e-4)] == 0.0)
        assert np.all(probs[causal & (p > threshold * (1 + 1e-4))] > 0)
        inside = (probs > 1e-3) & (probs < 1 - 1e-3)
        fitted = (probs[inside] - p[inside]) / (1.0 - p[inside])  # ζ = 1: q = (1−γ)p + γ
        assert inside.sum() > 100
        np.testing.assert_allclose(np.median(fitted), gamma, atol=1e-5)


def test_cli_alpha_trains_with_gamma_of_the_data_seq_len():
    # qtransformers train --config configs/tiny_opt.py:clipped --config.model.alpha=4: T = 64.
    cfg, seq_len = cli_model_config("--config.model.alpha=4")
    assert seq_len == 64
    check_clipped_probs(cfg, seq_len, gamma=-1 / 16)
    # The −4/512 the OPT preset used to pin would leave entries in [1/129, 1/17) non-zero.
    _, probs = next(iter(captured_attention(cfg, seq_len).values()))
    assert np.sum(probs == 0) > 0


def test_explicit_alpha_seq_len_wins_over_data_seq_len():
    cfg, seq_len = cli_model_config("--config.model.alpha=4", "--config.model.alpha_seq_len=32")
    check_clipped_probs(cfg.replace(num_layers=1), seq_len, gamma=-4 / 32)


def test_paper_opt_preset_at_512_computes_gamma_12_over_512():
    config = load_config_file("configs/opt_125m.py", "clipped")
    assert config.data.seq_len == 512
    config.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64, vocab_size=256)
    config.train.compute_dtype = "float32"  # the preset trains in bfloat16
    cfg = model_config_from(config)
    check_clipped_probs(cfg, 512, gamma=-12 / 512)


def test_old_flat_config_loads_and_replace_reaches_the_model():
    # A run's config.json 'resolved_model' from before AttentionSpec: flat keys, fused_attention.
    old = {**get_model_config("opt_tiny").to_dict(), "softmax": "clipped", "alpha": 4.0,
           "alpha_seq_len": None, "fused_attention": False, "gate": "linear"}
    cfg = ModelConfig.from_dict(old)
    assert isinstance(cfg.attention, AttentionSpec)
    assert cfg.attention.alpha_seq_len == cfg.max_len  # what such a run trained with
    assert set(cfg.to_dict()) == set(old) - {"fused_attention"}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(attention=AttentionSpec(gate="mlp")).attention == AttentionSpec(gate="mlp")
    with pytest.raises(ValueError, match="model.gate_init"):
        cfg.replace(gate_init=1.0)

    # cfg.replace(gate="linear", gate_scale=2.0) doubles the gated context, so the first
    # attention layer's output minus its bias doubles.
    base = get_model_config("opt_tiny", num_layers=1, gate="linear")
    ids = jnp.arange(16)[None] % base.vocab_size
    params = meta.unbox(build_model(base).init(jax.random.PRNGKey(0), ids)["params"])
    out_bias = np.asarray(params["decoder"]["layers_0"]["attention"]["out"]["bias"])

    def attention_out(cfg):
        _, state = build_model(cfg).apply({"params": params}, ids, mutable=["intermediates"],
                                          capture_intermediates=lambda m, _: m.name == "attention")
        return np.asarray(state["intermediates"]["decoder"]["layers_0"]["attention"]["__call__"][0])

    one, two = attention_out(base), attention_out(base.replace(gate="linear", gate_scale=2.0))
    np.testing.assert_allclose(two - out_bias, 2 * (one - out_bias), atol=1e-5)
    assert np.abs(one - out_bias).max() > 1e-3


def test_parameter_names_of_attention_are_unchanged():
    cfg = get_model_config("opt_tiny", num_layers=1, softmax="sink", gate="mlp")
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0),
                            jnp.ones((1, 8), jnp.int32))["params"]
    paths = sorted(jax.tree_util.keystr(p) for p, _ in
                   jax.tree_util.tree_leaves_with_path(meta.unbox(shapes))
                   if "attention']" in jax.tree_util.keystr(p))
    prefix = "['decoder']['layers_0']['attention']"
    assert paths == sorted(prefix + s for s in (
        "['gate']['hidden_bias']", "['gate']['hidden_kernel']", "['gate']['out_bias']",
        "['gate']['out_kernel']", "['key']['bias']", "['key']['kernel']", "['out']['bias']",
        "['out']['kernel']", "['query']['bias']", "['query']['kernel']", "['sink']",
        "['value']['bias']", "['value']['kernel']"))


@pytest.mark.parametrize("path,arg,expected", [
    # Fingerprints the trainer recorded before AttentionSpec (commit 3d4a2bb): unchanged configs
    # keep them. OPT's clipped runs keep theirs at data.seq_len = 512 (T was pinned to 512).
    ("configs/tiny_opt.py", "vanilla", "53ddb6a5dbe9a36f"),
    ("configs/tiny_opt.py", "gated", "ed9657781f44a07a"),
    ("configs/tiny_bert.py", "clipped", "e86e822c7141c97b"),
    ("configs/tiny_vit.py", "clipped", "be773e917f750a6f"),
    ("configs/opt_125m.py", "clipped", "a2bcf750fbd39fbb")])
def test_run_fingerprints_of_unchanged_configs_are_stable(path, arg, expected):
    config = load_config_file(path, arg)
    model_cfg = validate_config(config, check_paths=False)
    assert run_identity.fingerprint(run_identity.config_fields(config, model_cfg)) == expected
