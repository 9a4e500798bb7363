"""attention_impl in Attention, NnxAttention and the models; sinks and softpick vs NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.linen import meta

from qtransformers import Attention, AttentionSpec, ModelConfig, build_model, get_model_config
from qtransformers.nn.nnx_attention import NnxAttention, nnx_attention_from_linen
from qtransformers.nn.quant_point import QSTATS, QuantContext, quant_context
from qtransformers.ops.softmax import sink_softmax, softmax1, softpick

B, T, D_MODEL, H = 2, 21, 16, 2
X = jax.random.normal(jax.random.PRNGKey(0), (B, T, D_MODEL))
PADDING = jnp.array([[True] * T, [True] * (T - 6) + [False] * 6])


def np_sink_softmax(x, sink):
    e = np.exp(x)
    return e / (np.exp(sink) + e.sum(-1, keepdims=True))


def np_softpick(x, eps=1e-8):
    """The paper's formula, relu(eˣ − 1) / (Σ|eˣ − 1| + ε), with ε scaled as the reference's."""
    m = x.max(-1, keepdims=True)
    return np.maximum(np.exp(x) - 1, 0) / (np.abs(np.exp(x) - 1).sum(-1, keepdims=True)
                                           + eps * np.exp(m))


def test_sink_softmax_and_softpick_match_numpy():
    x = np.random.default_rng(0).normal(scale=2.0, size=(3, 4, 5, 9))
    sink = np.array([-1.0, 0.0, 0.5, 3.0])[:, None, None]
    np.testing.assert_allclose(sink_softmax(jnp.asarray(x, jnp.float32), sink),
                               np_sink_softmax(x, sink), atol=1e-6)
    np.testing.assert_allclose(softmax1(jnp.asarray(x, jnp.float32)), np_sink_softmax(x, 0.0),
                               atol=1e-6)
    got = np.asarray(softpick(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, np_softpick(x), atol=1e-6)
    assert np.all(got[x <= 0] == 0.0) and np.all(got[x > 0] > 0)
    # Masked keys take no part: the same as softpick over the kept keys only.
    keep = np.array([True, False, True, True, False, True, True, True, False])
    masked = np.asarray(softpick(jnp.asarray(x, jnp.float32), where=keep))
    np.testing.assert_allclose(masked[..., keep], np_softpick(x[..., keep]), atol=1e-6)
    assert np.all(masked[..., ~keep] == 0.0)


def make_attention(num_heads=H, causal=False, **spec_fields):
    """Attention with an AttentionSpec of `spec_fields`."""
    return Attention(num_heads=num_heads, spec=AttentionSpec(**spec_fields), causal=causal)


def init_and_apply(module, x=X, **kw):
    variables = module.init(jax.random.PRNGKey(1), x, PADDING)
    return variables, jax.jit(lambda v, x: module.apply(v, x, PADDING, **kw))


@pytest.mark.parametrize("softmax,gate", [("clipped", "linear"), ("sink", "elementwise")])
def test_blocked_module_equals_materialized_with_gate_and_dropout(softmax, gate):
    fields = dict(softmax=softmax, gamma=-0.1, gate=gate, causal=True,
                  attention_dropout_rate=0.2)
    rngs = {"dropout": jax.random.PRNGKey(5)}
    ref = make_attention(**fields)
    variables = ref.init(jax.random.PRNGKey(1), X, PADDING)
    blocked = make_attention(**fields, attention_impl="blocked", attention_block_size=8)

    def loss(module, params):
        out = module.apply({"params": params}, X, PADDING, deterministic=False, rngs=rngs)
        return jnp.sum(jnp.where(PADDING[..., None], out, 0.0) ** 2), out

    params = meta.unbox(variables["params"])
    (_, want), want_grads = jax.jit(jax.value_and_grad(lambda p: loss(ref, p), has_aux=True))(
        params)
    (_, got), got_grads = jax.jit(jax.value_and_grad(lambda p: loss(blocked, p),
                                                     has_aux=True))(params)
    np.testing.assert_allclose(got, want, atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4),
                 got_grads, want_grads)
    if softmax == "sink":
        assert float(jnp.abs(want_grads["sink"]).max()) > 0


def test_nnx_blocked_equals_linen_materialized_sink():
    linen = make_attention(softmax="sink", causal=True)
    variables = linen.init(jax.random.PRNGKey(1), X, PADDING)
    params = meta.unbox(variables["params"])
    params["sink"] = jnp.array([1.0, -0.5])
    want = linen.apply({"params": params}, X, PADDING)
    ours = NnxAttention(D_MODEL, H, AttentionSpec(softmax="sink", attention_impl="blocked",
                                                  attention_block_size=8),
                        causal=True, rngs=nnx.Rngs(0))
    nnx_attention_from_linen(ours, params)
    np.testing.assert_allclose(ours(X, PADDING), want, atol=1e-5)


def test_blocked_refuses_to_calibrate_attention_probs():
    module = make_attention(softmax="clipped", gamma=-0.1, attention_impl="blocked")
    variables = module.init(jax.random.PRNGKey(1), X, PADDING)
    calibrate = lambda m: jax.jit(lambda v: m.apply(v, X, PADDING, mutable=[QSTATS]))(variables)
    with pytest.raises(ValueError, match="attention_impl='materialized'"):
        calibrate(module)

    def per_token(v):
        with quant_context(QuantContext(granularity="per_token")):
            return module.apply(v, X, PADDING)

    with pytest.raises(ValueError, match=r"\['scores', 'probs'\]"):
        jax.jit(per_token)(variables)
    _, stats = calibrate(make_attention(softmax="clipped", gamma=-0.1))
    assert {"scores", "probs"} <= set(stats[QSTATS])


def test_model_config_attention_impl_fields():
    cfg = ModelConfig.from_dict({**get_model_config("opt_tiny").to_dict(),
                                 "fused_attention": True})
    assert cfg.attention_impl == "fused" and "fused_attention" not in cfg.to_dict()
    with pytest.raises(ValueError, match="model.attention_impl='flash' is unknown"):
        get_model_config("opt_tiny", attention_impl="flash")
    with pytest.raises(ValueError, match="attention_impl='blocked'"):
        get_model_config("opt_tiny", "clipped", attention_impl="fused")
    with pytest.raises(ValueError, match="attention_dropout_rate"):
        get_model_config("bert_tiny", attention_impl="fused")


@pytest.mark.parametrize("impl,softmax", [("blocked", "clipped"), ("fused", "sink")])
def test_opt_logits_equal_across_attention_impls(impl, softmax):
    cfg = get_model_config("opt_tiny", num_layers=2, softmax=softmax, alpha=4.0, alpha_seq_len=T)
    ids = jax.random.randint(jax.random.PRNGKey(2), (B, T), 0, cfg.vocab_size)
    model = build_model(cfg)
    params = model.init(jax.random.PRNGKey(3), ids, PADDING)["params"]
    want = jax.jit(model.apply)({"params": params}, ids, PADDING)
    other = build_model(cfg.replace(attention_impl=impl, attention_block_size=8))
    got = jax.jit(other.apply)({"params": params}, ids, PADDING)
    valid = np.asarray(PADDING)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-4)
