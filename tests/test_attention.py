"""Attention module: stock-Flax parity via attention_fn, gates, causality, errors."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.linen import meta

from qtransformers import Attention, AttentionSpec, attention_fn
from qtransformers.ops import gates as gate_ops
from qtransformers.ops.gates import GATE_VARIANTS

B, T, D_MODEL, H = 2, 6, 32, 4
X = jax.random.normal(jax.random.PRNGKey(0), (B, T, D_MODEL))
PADDING = jnp.array([[1] * T, [1] * (T - 2) + [0, 0]], dtype=bool)
METHODS = [("vanilla", {}), ("clipped", dict(gamma=-0.05)),
           ("clipped", dict(alpha=2.0, alpha_seq_len=T)), ("softmax1", {})]


def make_attention(num_heads=H, causal=False, **spec_fields):
    """Attention with an AttentionSpec of `spec_fields`."""
    return Attention(num_heads=num_heads, spec=AttentionSpec(**spec_fields), causal=causal)


def full_mask():
    return nn.combine_masks(nn.make_attention_mask(PADDING, PADDING),
                            nn.make_causal_mask(jnp.ones((B, T)))).astype(bool)


@pytest.mark.parametrize("softmax,kw", METHODS)
def test_attention_fn_in_stock_flax_equals_our_module(softmax, kw):
    ours = make_attention(softmax=softmax, causal=True, **kw)
    variables = ours.init(jax.random.PRNGKey(1), X, PADDING)
    expected = ours.apply(variables, X, PADDING)
    stock = nn.MultiHeadDotProductAttention(num_heads=H, attention_fn=attention_fn(softmax, **kw))
    got = stock.apply({"params": meta.unbox(variables["params"])}, X, mask=full_mask())
    valid = np.asarray(PADDING)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid], atol=1e-5)


def test_attention_fn_in_nnx_multihead_attention():
    kw = dict(gamma=-0.05)
    ours = make_attention(softmax="clipped", **kw)
    variables = ours.init(jax.random.PRNGKey(1), X)
    params = meta.unbox(variables["params"])
    stock = nnx.MultiHeadAttention(H, D_MODEL, decode=False, rngs=nnx.Rngs(0),
                                   attention_fn=attention_fn("clipped", **kw))
    for name in ("query", "key", "value", "out"):
        getattr(stock, name).kernel[...] = params[name]["kernel"]
        getattr(stock, name).bias[...] = params[name]["bias"]
    np.testing.assert_allclose(stock(X), ours.apply(variables, X), atol=1e-5)


def test_clipped_attention_differs_from_vanilla_and_output_shape():
    out = {}
    for softmax, kw in METHODS[:2]:
        module = make_attention(softmax=softmax, **kw)
        out[softmax] = module.apply(module.init(jax.random.PRNGKey(1), X), X)
    chex.assert_shape(out["clipped"], (B, T, D_MODEL))
    assert float(jnp.abs(out["clipped"] - out["vanilla"]).max()) > 1e-4


@pytest.mark.parametrize("gate", [g for g in GATE_VARIANTS if g != "none"])
@pytest.mark.parametrize("pi_init", [0.25, 0.5, 0.9])
def test_gate_init_equals_pi_init(gate, pi_init):
    module = make_attention(gate=gate, gate_init=pi_init)
    variables = module.init(jax.random.PRNGKey(2), X)
    gate_params = meta.unbox(variables["params"])["gate"]
    bias = {"linear": lambda p: p["bias"], "mlp": lambda p: p["out_bias"],
            "unconditional": lambda p: p["logits"]}.get(gate, lambda p: p["dense"]["bias"])
    np.testing.assert_allclose(jax.nn.sigmoid(bias(gate_params)), pi_init, rtol=1e-6)
    # With zero gate weights the gate value itself is pi_init everywhere.
    _, state = module.apply(jax.tree.map(lambda v: v, variables), X, mutable=["intermediates"])
    assert state["intermediates"]["gate_values"][0].shape[-1] in (H, D_MODEL // H)


def test_linear_gate_reads_only_its_own_chunk():
    module = make_attention(gate="linear")
    variables = module.init(jax.random.PRNGKey(3), X)
    gate_fn = lambda x: module.apply(variables, x, mutable=["intermediates"])[1][
        "intermediates"]["gate_values"][0]
    head_dim = D_MODEL // H
    changed = X.at[..., head_dim:].add(5.0)  # touch every chunk except head 0's
    before, after = gate_fn(X), gate_fn(changed)
    np.testing.assert_array_equal(before[..., 0], after[..., 0])
    assert np.all(np.abs(np.asarray(before[..., 1:] - after[..., 1:])) > 0)


@pytest.mark.parametrize("gate", ["linear", "mlp", "all_heads_linear", "unconditional",
                                  "headwise", "elementwise"])
def test_gate_forced_closed_gives_output_bias(gate):
    module = make_attention(gate=gate)
    variables = meta.unbox(module.init(jax.random.PRNGKey(4), X))
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.full_like(v, -1e4) if "gate" in jax.tree_util.keystr(path) and
        ("bias" in jax.tree_util.keystr(path) or "logits" in jax.tree_util.keystr(path))
        else (jnp.zeros_like(v) if "gate" in jax.tree_util.keystr(path) else v),
        variables["params"])
    params["out"]["bias"] = jnp.arange(D_MODEL, dtype=jnp.float32)
    out = module.apply({"params": params}, X)
    np.testing.assert_allclose(out, jnp.broadcast_to(params["out"]["bias"], out.shape), atol=1e-5)


@pytest.mark.parametrize("gate", GATE_VARIANTS)
def test_gate_parameter_counts_match_table4(gate):
    module = make_attention(gate=gate, gate_hidden=None)
    variables = module.init(jax.random.PRNGKey(5), X)
    params = meta.unbox(variables["params"])
    count = sum(v.size for v in jax.tree.leaves(params.get("gate", {})))
    head_dim = D_MODEL // H
    formula = {"none": 0, "linear": H * (head_dim + 1),
               "mlp": H * ((head_dim // 4) * (head_dim + 2) + 1),
               "all_heads_linear": H * (D_MODEL + 1), "headwise": H * (D_MODEL + 1),
               "elementwise": D_MODEL * (D_MODEL + 1), "unconditional": H}[gate]
    assert count == formula == gate_ops.gate_param_count(gate, D_MODEL, H)


@pytest.mark.parametrize("gate", GATE_VARIANTS)
@pytest.mark.parametrize("softmax,kw", METHODS)
def test_causal_attention_never_sees_the_future(gate, softmax, kw):
    module = make_attention(softmax=softmax, gate=gate, causal=True, **kw)
    variables = module.init(jax.random.PRNGKey(6), X)
    apply = jax.jit(module.apply)
    base = apply(variables, X)
    for t in range(T - 1):
        changed = X.at[:, t + 1:].set(jax.random.normal(jax.random.PRNGKey(t), (B, T - t - 1,
                                                                               D_MODEL)))
        np.testing.assert_allclose(apply(variables, changed)[:, :t + 1], base[:, :t + 1],
                                   atol=1e-6)


def test_fused_path_equals_reference_path():
    ref = make_attention(causal=True, gate="linear")
    variables = ref.init(jax.random.PRNGKey(7), X, PADDING)
    fused = make_attention(causal=True, gate="linear", attention_impl="fused")
    valid = np.asarray(PADDING)
    np.testing.assert_allclose(np.asarray(fused.apply(variables, X, PADDING))[valid],
                               np.asarray(ref.apply(variables, X, PADDING))[valid], atol=1e-5)


def test_dropout_needs_rng_and_changes_output():
    module = make_attention(attention_dropout_rate=0.5)
    variables = module.init(jax.random.PRNGKey(8), X)
    det = module.apply(variables, X)
    drop = module.apply(variables, X, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    assert float(jnp.abs(det - drop).max()) > 1e-3
    with pytest.raises(Exception, match="dropout"):
        module.apply(variables, X, deterministic=False)


@pytest.mark.parametrize("kwargs,message", [
    (dict(softmax="sparse"), "softmax"), (dict(gate="conditional"), "gate"),
    (dict(softmax="clipped", gamma=0.1), "gamma"), (dict(softmax="clipped", zeta=0.5), "zeta"),
    (dict(gate="linear", gate_init=1.0), "gate_init"), (dict(num_heads=5), "divisible"),
    (dict(attention_impl="fused", softmax="clipped", gamma=-0.1), "blocked"),
    (dict(softmax="clipped", alpha=4.0), "alpha_seq_len"),
    (dict(attention_impl="fused", attention_dropout_rate=0.1), "attention_dropout_rate=0"),
    (dict(attention_impl="flash"), "attention_impl")])
def test_bad_attention_settings(kwargs, message):
    fields = dict(num_heads=H)
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make_attention(**fields).init(jax.random.PRNGKey(0), X)
