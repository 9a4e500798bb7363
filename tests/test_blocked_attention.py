"""Blocked and fused attention equal the materialised path, for every softmax variant."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtransformers.ops import attention as attn_ops
from qtransformers.ops.blocked_attention import blocked_attention
from qtransformers.ops.fused_attention import fused_attention
from qtransformers.ops.softmax import SOFTMAX_VARIANTS, get_softmax_fn

B, T, H, D = 2, 37, 3, 8  # T divides neither block size below
BLOCK_Q, BLOCK_K = 16, 8
KEYS = jax.random.split(jax.random.PRNGKey(0), 5)
Q, K, V = (1.5 * jax.random.normal(k, (B, T, H, D)) for k in KEYS[:3])
COTANGENT = jax.random.normal(KEYS[3], (B, T, H, D))
SINK = jnp.array([0.5, -1.0, 2.0])
# Sequence 1 is left-padded: with a causal mask its first queries see no key at all.
PADDING = jnp.array([[True] * T, [False] * 4 + [True] * (T - 9) + [False] * 5])
VARIANTS = [("vanilla", {}), ("clipped", dict(gamma=-0.1)), ("clipped", dict(gamma=-0.03,
                                                                             zeta=1.05)),
            ("softmax1", {}), ("sink", {}), ("softpick", {})]
IDS = ["vanilla", "clipped", "clipped_zeta", "softmax1", "sink", "softpick"]


def materialized(q, k, v, sink, softmax, kw, causal, rate=0.0, rng=None):
    mask = attn_ops.combine_masks(attn_ops.padding_to_attention_mask(PADDING),
                                  attn_ops.causal_mask(T) if causal else None)
    probs = get_softmax_fn(softmax, sink=sink[:, None, None], **kw)(
        attn_ops.attention_scores(q, k), where=mask)
    probs = attn_ops.positional_attention_dropout(probs, rate, rng)
    return attn_ops.attention_context(probs, v)


def blocked(q, k, v, sink, softmax, kw, causal, rate=0.0, rng=None):
    return blocked_attention(q, k, v, softmax=softmax, sink=sink, key_mask=PADDING,
                             causal=causal, dropout_rate=rate, dropout_rng=rng, block_q=BLOCK_Q,
                             block_k=BLOCK_K, **kw)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def out_and_grads(fn, softmax, kw_items, causal, rate, rng):
    """Output and d(Σ out · cotangent)/d(q, k, v, sink) of one attention function."""
    out, vjp = jax.vjp(lambda *a: fn(*a, softmax, dict(kw_items), causal, rate, rng),
                       Q, K, V, SINK)
    return out, vjp(COTANGENT)


def assert_paths_equal(softmax, kw, causal, rate=0.0):
    rng = jax.random.PRNGKey(7)
    kw_items = tuple(sorted(kw.items()))
    ref_out, ref_grads = out_and_grads(materialized, softmax, kw_items, causal, rate, rng)
    out, grads = out_and_grads(blocked, softmax, kw_items, causal, rate, rng)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
    if softmax == "sink":
        assert float(jnp.abs(ref_grads[3]).max()) > 1e-3  # the sink really learns
        np.testing.assert_allclose(grads[3], ref_grads[3], atol=1e-4, rtol=1e-4)


# Every variant causal (with left padding: rows without keys); the variants with their own
# backward pass (clipped, softpick, sink) also bidirectional.
CASES = [(v, True) for v in VARIANTS] + [(VARIANTS[i], False) for i in (1, 4, 5)]


@pytest.mark.parametrize("variant,causal", CASES, ids=[
    f"{name}-{'causal' if causal else 'bidirectional'}"
    for name, causal in zip(IDS + [IDS[1], IDS[4], IDS[5]], [c for _, c in CASES])])
def test_blocked_equals_materialized(variant, causal):
    assert_paths_equal(*variant, causal)


@pytest.mark.parametrize("softmax,kw", [VARIANTS[1], VARIANTS[4], VARIANTS[5]],
                         ids=["clipped", "sink", "softpick"])
def test_blocked_equals_materialized_with_dropout(softmax, kw):
    assert_paths_equal(softmax, kw, causal=True, rate=0.3)


def test_rows_without_keys_are_zero_on_both_paths():
    out, _ = out_and_grads(blocked, "clipped", (("gamma", -0.1),), True, 0.0, None)
    assert np.all(np.asarray(out)[1, :4] == 0.0)  # left padding: nothing to attend to


def test_dense_mask_equals_materialized():
    mask = jax.random.bernoulli(KEYS[4], 0.7, (B, 1, T, T))

    @jax.jit
    def both(mask):
        probs = get_softmax_fn("clipped", gamma=-0.05)(attn_ops.attention_scores(Q, K),
                                                       where=mask)
        return attn_ops.attention_context(probs, V), blocked_attention(
            Q, K, V, softmax="clipped", gamma=-0.05, mask=mask, block_q=16, block_k=8)

    want, got = both(mask)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_dropout_mask_is_the_same_built_whole_or_in_blocks():
    keep_mask = jax.jit(attn_ops.dropout_keep_mask, static_argnums=3)
    seed = attn_ops.dropout_seed(jax.random.PRNGKey(3))
    whole = np.asarray(keep_mask(seed, jnp.arange(512), jnp.arange(512), 0.25))
    block = keep_mask(seed, jnp.arange(16, 32), jnp.arange(40, 48), 0.25)
    np.testing.assert_array_equal(block, whole[16:32, 40:48])
    assert abs(whole.mean() - 0.75) < 0.005  # 262k draws: 5 standard deviations ~ 0.004
    assert abs(whole[:, 1:].mean() - whole[:, 1:][whole[:, :-1]].mean()) < 0.01  # neighbours
    assert abs(whole[1:].mean() - whole[1:][whole[:-1]].mean()) < 0.01
    other = np.asarray(keep_mask(attn_ops.dropout_seed(jax.random.PRNGKey(4)), jnp.arange(512),
                                 jnp.arange(512), 0.25))
    assert 0.36 < (other != whole).mean() < 0.39  # 2·0.25·0.75 = 0.375 if independent


@pytest.mark.parametrize("softmax", ["vanilla", "softmax1", "sink"])
def test_fused_equals_materialized(softmax):
    ref_out, ref_grads = out_and_grads(materialized, softmax, (), True, 0.0, None)

    def fused(q, k, v, sink, softmax, kw, causal, rate, rng):
        return fused_attention(q, k, v, softmax=softmax, sink=sink, causal=causal,
                               mask=attn_ops.padding_to_attention_mask(PADDING))

    out, grads = out_and_grads(fused, softmax, (), True, 0.0, None)
    valid = np.array(PADDING)  # the vanilla softmax has no defined output for keyless rows
    valid[1, :4] = softmax != "vanilla"
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref_out)[valid], atol=1e-5)
    if softmax != "vanilla":
        for got, want in zip(grads, ref_grads):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("softmax", ["clipped", "softpick"])
def test_fused_refuses_what_it_cannot_express(softmax):
    with pytest.raises(ValueError, match="attention_impl='blocked'"):
        fused_attention(Q, K, V, softmax=softmax)


def test_blocked_memory_is_linear_in_length():
    """Compiled fwd + bwd temp memory: the materialised path holds (B, H, T, T) float32 tensors."""
    length, heads = 512, 2
    x = jnp.ones((1, length, heads, 16))

    def temp_bytes(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def ref(q, k, v):
        probs = get_softmax_fn("clipped", gamma=-0.01)(attn_ops.attention_scores(q, k))
        return attn_ops.attention_context(probs, v)

    scores_bytes = heads * length * length * 4
    assert temp_bytes(ref) >= scores_bytes
    assert temp_bytes(lambda q, k, v: blocked_attention(
        q, k, v, softmax="clipped", gamma=-0.01, block_q=64, block_k=64)) < scores_bytes / 4


def test_unknown_variant_and_bad_block_size():
    with pytest.raises(ValueError, match="softmax"):
        blocked_attention(Q, K, V, softmax="sparsemax")
    with pytest.raises(ValueError, match="block"):
        blocked_attention(Q, K, V, block_q=0)
    assert set(SOFTMAX_VARIANTS) == {name for name, _ in VARIANTS}


def test_pallas_clipped_kernel_in_interpret_mode_equals_materialized():
    from qtransformers.ops.pallas_attention import pallas_clipped_attention
    q, k, v = (x[:1, :20, :1] for x in (Q, K, V))
    padding = jnp.array([[False] * 2 + [True] * 15 + [False] * 3])

    def ref(q, k, v):
        mask = attn_ops.combine_masks(attn_ops.padding_to_attention_mask(padding),
                                      attn_ops.causal_mask(20))
        probs = get_softmax_fn("clipped", gamma=-0.1)(attn_ops.attention_scores(q, k), where=mask)
        return attn_ops.attention_context(probs, v)

    def kernel(q, k, v):
        return pallas_clipped_attention(q, k, v, gamma=-0.1, key_mask=padding, causal=True,
                                        block_q=8, block_k=8, interpret=True)

    cotangent = COTANGENT[:1, :20, :1]
    both = jax.jit(lambda *a: [jax.vjp(f, *a) for f in (ref, kernel)])
    (want, want_vjp), (got, got_vjp) = both(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(got_vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
