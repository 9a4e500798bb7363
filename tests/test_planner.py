"""The planner's parameter counts equal the real models'; its memory estimate tracks XLA's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qtransformers import build_model, get_model_config
from qtransformers.models import MODEL_PRESETS
from qtransformers.planner import (check_fits, count_params, flops_per_token, plan_training,
                                   resolve_mesh)


def model_inputs(cfg, batch=1, seq_len=8):
    if cfg.family == "vit":
        return (jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.num_channels)),)
    return (jnp.ones((batch, seq_len), jnp.int32),)


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
@pytest.mark.parametrize("method", ["vanilla", "clipped", "gated"])
def test_param_count_equals_model(preset, method):
    cfg = get_model_config(preset, method)
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), *model_inputs(cfg))
    assert count_params(cfg) == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


@pytest.mark.parametrize("preset,overrides,batch,seq_len", [
    ("opt_tiny", {}, 8, 64), ("bert_tiny", dict(vocab_size=2000), 16, 128),
    ("opt_tiny", dict(d_model=128, d_ff=512), 16, 128)])
def test_memory_estimate_within_20_percent_of_xla(preset, overrides, batch, seq_len):
    cfg = get_model_config(preset, **overrides)
    model = build_model(cfg)
    ids = jnp.ones((batch, seq_len), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"])
    tx = optax.adamw(1e-3)

    def train_step(p, opt_state, rng):
        def loss_fn(q):
            logits = model.apply({"params": q}, ids, deterministic=False, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()
        updates, opt_state = tx.update(jax.grad(loss_fn)(p), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, jax.eval_shape(tx.init, params), jax.random.PRNGKey(0)).compile()
    mem = compiled.memory_analysis()
    xla_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                 + mem.temp_size_in_bytes)
    plan = plan_training(cfg, global_batch_size=batch, num_devices=1, seq_len=seq_len)
    assert abs(plan.total_bytes / xla_bytes - 1.0) < 0.2, (plan.total_bytes, xla_bytes)


def test_flops_follow_six_n_rule_and_mesh_errors():
    cfg = get_model_config("opt_125m")
    per_token = flops_per_token(cfg, 512)
    non_embedding = cfg.num_layers * (12 * 768 ** 2 + 13 * 768)
    assert 6 * non_embedding < per_token < 6 * (non_embedding + 50272 * 768) + 12 * 12 * 512 * 768
    plan = plan_training(cfg, global_batch_size=192, num_devices=16,
                         mesh_shape={"data": -1, "fsdp": 4, "tensor": 1}, seq_len=512)
    assert plan.per_device_batch == 12
    assert plan.flops_per_step == pytest.approx(per_token * 192 * 512)
    assert resolve_mesh({"data": -1, "tensor": 2}, 8) == {"data": 4, "tensor": 2}
    with pytest.raises(ValueError, match="does not divide"):
        resolve_mesh({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="multiply to 8"):
        resolve_mesh({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        plan_training(cfg, global_batch_size=100, num_devices=16)
    big = plan_training(get_model_config("opt_1.3b"), global_batch_size=64, num_devices=1,
                        seq_len=2048)
    with pytest.raises(ValueError, match="shard more"):
        check_fits(big, 16e9)
