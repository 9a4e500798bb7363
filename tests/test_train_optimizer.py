"""Decay masks, schedules and gradient accumulation (2 micro-batches == one big batch)."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from qtransformers.models import build_model, get_model_config
from qtransformers.train import mesh as mesh_lib
from qtransformers.train.config import base_config
from qtransformers.train.optimizer import decay_mask, make_optimizer, make_schedule
from qtransformers.train.state import make_init_fn, state_shardings
from qtransformers.train.step import make_train_step


def _params(preset, method):
    cfg = get_model_config(preset, method, dropout_rate=0.0, attention_dropout_rate=0.0)
    model = build_model(cfg)
    init = make_init_fn(model, cfg, make_optimizer(base_config(preset).optim, 10)[0], 16)
    return jax.eval_shape(init, jax.random.PRNGKey(0)).params


@pytest.mark.parametrize("preset,method", [("bert_tiny", "gated"), ("opt_tiny", "gated"),
                                           ("vit_tiny", "clipped")])
def test_decay_mask_excludes_bias_and_layernorm(preset, method):
    params = _params(preset, method)
    for decay_ln_scale in (False, True):
        flat = traverse_util.flatten_dict(decay_mask(params, decay_ln_scale), sep="/")
        for path, decayed in flat.items():
            leaf = path.split("/")[-1]
            if leaf == "bias" or leaf.endswith("_bias"):
                assert not decayed, path
            elif leaf == "scale":
                assert decayed == decay_ln_scale, path
            else:
                assert decayed, path
        assert any(p.endswith("norm/scale") for p in flat)
        assert any("gate" in p and p.endswith("bias") for p in flat) or preset == "vit_tiny"
    flat = traverse_util.flatten_dict(decay_mask(params, no_decay=("*cls_token",)), sep="/")
    if preset == "vit_tiny":
        assert not flat["cls_token"] and flat["position_embeddings"]


def test_schedule_warmup_then_linear_or_cosine_decay():
    optim = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=10, schedule="linear",
                                           min_lr_ratio=0.1))
    lr = make_schedule(optim, 110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    optim.schedule = "cosine"
    lr = make_schedule(optim, 110)
    np.testing.assert_allclose([lr(10), lr(60), lr(110)], [1.0, 0.55, 0.1], atol=1e-6)
    optim.update(schedule="constant", warmup_steps=0)
    assert float(make_schedule(optim, 110)(77)) == 1.0


def test_grad_accumulation_equals_one_big_batch(preset="opt_tiny"):
    cfg = get_model_config(preset, "gated", dropout_rate=0.0, attention_dropout_rate=0.0)
    model = build_model(cfg)
    optim = base_config(preset).optim
    tx, schedule = make_optimizer(optim, 10)
    config = base_config(preset)
    rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    _, shardings = state_shardings(model, cfg, tx, 16, mesh, rules)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, cfg.vocab_size, (16, 16)).astype(np.int32),
             "attention_mask": np.ones((16, 16), np.int32),
             "targets": rng.integers(0, cfg.vocab_size, (16, 16)).astype(np.int32),
             # uneven weights per row: accumulation must normalise by the total, not per micro
             "weights": (rng.random((16, 16)) < np.linspace(0.1, 0.9, 16)[:, None]
                         ).astype(np.float32)}
    batch = mesh_lib.global_batch(batch, mesh, rules, 16)
    init = jax.jit(make_init_fn(model, cfg, tx, 16), out_shardings=shardings)
    results = []
    with mesh_lib.sharding_context(mesh, rules):
        for accum in (1, 2):
            step = jax.jit(make_train_step(model, cfg.family, tx, schedule, accum, mesh, rules))
            state = init(jax.random.PRNGKey(0))
            for _ in range(2):
                state, metrics = step(state, batch)
            results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m2, p2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    assert m1["weight_sum"] == m2["weight_sum"]
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_mlm_head_on_masked_positions_only_equals_the_full_head():
    import jax
    import numpy as np

    from qtransformers.models import build_model, get_model_config
    from qtransformers.train.objectives import (apply_model, compute_objective,
                                                select_predictions)

    cfg = get_model_config("bert_tiny", num_layers=1, vocab_size=97)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 97, (4, 24)).astype(np.int32)
    weights = (rng.random((4, 24)) < 0.25).astype(np.float32)
    weights[3] = 0.0  # a row with nothing to predict
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "targets": rng.integers(5, 97, (4, 24)).astype(np.int32), "weights": weights}
    params = model.init(jax.random.PRNGKey(0), ids)["params"]

    def loss(p, b):
        sums = compute_objective("bert", apply_model(model, p, b, "bert", deterministic=True), b)
        return sums["loss_sum"] / sums["weight_sum"], sums

    k = int(weights.sum(1).max())
    (full, full_sums), full_grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
    selected = select_predictions(batch, k)
    assert selected["predict_positions"].shape == (4, k)
    np.testing.assert_array_equal(  # the weighted positions, in order
        np.asarray(selected["predict_positions"][0][:int(weights[0].sum())]),
        np.flatnonzero(weights[0]))
    (part, part_sums), part_grads = jax.value_and_grad(loss, has_aux=True)(params, selected)
    np.testing.assert_allclose(part, full, rtol=1e-6)
    assert float(part_sums["weight_sum"]) == weights.sum()
    for a, b in zip(jax.tree.leaves(part_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    # A smaller K keeps the first K weighted positions of each row.
    capped = select_predictions(batch, 2)
    assert float(capped["weights"].sum()) == np.minimum(weights.sum(1), 2).sum()
