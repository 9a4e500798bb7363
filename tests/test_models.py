"""BERT / OPT / ViT: every attention variant compiles forward and backward; masks; configs."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qtransformers import ModelConfig, build_model, get_model_config
from qtransformers.models import MODEL_PRESETS, opt_positions

VARIANTS = [dict(), dict(softmax="clipped", gamma=-0.03), dict(softmax="clipped", alpha=4.0),
            dict(softmax="softmax1"), dict(gate="linear", gate_init=0.25), dict(gate="mlp"),
            dict(gate="all_heads_linear"), dict(gate="unconditional"), dict(gate="headwise"),
            dict(gate="elementwise")]
B, T = 2, 12


def inputs_for(cfg):
    if cfg.family == "vit":
        images = jax.random.normal(jax.random.PRNGKey(0), (B, cfg.image_size, cfg.image_size, 3))
        return (images,), jnp.array([1, 3])
    ids = jax.random.randint(jax.random.PRNGKey(0), (B, T), 0, cfg.vocab_size)
    mask = jnp.ones((B, T), jnp.int32).at[1, -3:].set(0)
    return (ids, mask), ids


CASES = ([("bert_tiny", v) for v in VARIANTS]
         + [(p, v) for p in ("opt_tiny", "vit_tiny") for v in (VARIANTS[0], VARIANTS[1],
                                                                VARIANTS[4])])


@pytest.mark.parametrize("preset,variant", CASES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(map(str, v.values())) or "vanilla")
def test_forward_backward_compiles(preset, variant):
    # One layer keeps compile time down; every layer is the same block.
    cfg = get_model_config(preset, num_layers=1, **variant)
    model = build_model(cfg)
    args, labels = inputs_for(cfg)
    variables = model.init(jax.random.PRNGKey(1), *args)

    @jax.jit
    def loss_and_grad(params, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, *args, deterministic=False,
                                 rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, logits), grads = loss_and_grad(variables["params"], jax.random.PRNGKey(2))
    expected = (B, cfg.num_classes) if cfg.family == "vit" else (B, T, cfg.vocab_size)
    chex.assert_shape(logits, expected)
    chex.assert_tree_all_finite(grads)
    assert np.isfinite(float(loss))
    grad_norm = optax.tree.norm(grads)
    assert float(grad_norm) > 0


@pytest.mark.parametrize("variant", VARIANTS[:5] + [dict(gate="headwise")],
                         ids=lambda v: "-".join(map(str, v.values())) or "vanilla")
def test_opt_never_sees_future_tokens(variant):
    cfg = get_model_config("opt_tiny", num_layers=1, **variant)
    model = build_model(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(0), (B, T), 0, cfg.vocab_size)
    variables = model.init(jax.random.PRNGKey(1), ids)
    apply = jax.jit(model.apply)
    base = apply(variables, ids)
    for t in range(0, T - 1, 3):
        changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 7) % cfg.vocab_size)
        np.testing.assert_allclose(apply(variables, changed)[:, :t + 1], base[:, :t + 1],
                                   atol=1e-5)


def test_bert_padding_does_not_leak_into_real_tokens():
    cfg = get_model_config("bert_tiny", gate="linear", softmax="clipped", gamma=-0.05)
    model = build_model(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(0), (1, T), 0, cfg.vocab_size)
    mask = jnp.ones((1, T), jnp.int32).at[0, -4:].set(0)
    variables = model.init(jax.random.PRNGKey(1), ids, mask)
    base = model.apply(variables, ids, mask)
    other = model.apply(variables, ids.at[0, -4:].set(5), mask)
    np.testing.assert_allclose(other[0, :-4], base[0, :-4], atol=1e-5)


def test_opt_positions_follow_huggingface_rule():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(opt_positions(mask), [[1, 1, 2, 3, 4], [2, 3, 4, 1, 1]])


def test_paper_presets_have_paper_shapes():
    cfg = get_model_config("opt_125m")
    model = build_model(cfg.replace(num_layers=1))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))
    one_layer = sum(np.prod(v.shape) for v in jax.tree.leaves(shapes))
    embeddings = 50272 * 768 + (2048 + 2) * 768
    layer = 4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    assert one_layer == embeddings + layer + 2 * 768  # + final LayerNorm
    assert set(MODEL_PRESETS) >= {"bert_base", "bert_6l", "opt_125m", "opt_350m", "opt_1.3b",
                                  "vit_s16"}


@pytest.mark.parametrize("overrides,field", [
    (dict(family="gpt"), "family"), (dict(num_heads=5), "divisible"),
    (dict(softmax="clipped", gamma=0.2), "gamma"), (dict(gate="linear", gate_init=0.0),
                                                    "gate_init"),
    (dict(activation="swish"), "activation"), (dict(dtype="int8"), "dtype"),
    (dict(colour="blue"), "colour"), (dict(dropout_rate=1.5), "dropout_rate")])
def test_bad_model_config(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**ModelConfig().to_dict(), **overrides})


def test_sequence_longer_than_positions_is_rejected():
    cfg = get_model_config("bert_tiny", max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        build_model(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 9), jnp.int32))
