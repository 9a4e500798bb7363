"""Data-parallel, FSDP and tensor-parallel runs give the losses of a 1-device run."""
import os

import jax
import numpy as np
import pytest

from qtransformers.train.config import load_config_file
from qtransformers.train.loop import Trainer
from qtransformers.train.writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


def _config(data, fsdp, tensor):
    config = load_config_file(os.path.join(ROOT, "configs", "tiny_opt.py"), "gated")
    config.data.seq_len = 32
    config.model.num_layers = 1  # compile time dominates; one block exercises every rule
    config.train.update(num_steps=STEPS, log_every=1, eval_every=0, outlier_eval_every=0,
                        checkpoint_every=0, async_checkpoint=False)
    config.mesh.shape.update(data=data, fsdp=fsdp, tensor=tensor)
    return config  # dropout stays on: threefry draws the same bits under any sharding


def _run(tmp_path, shape, devices=None):
    workdir = str(tmp_path / "x".join(map(str, shape)))
    trainer = Trainer(_config(*shape), workdir, devices=devices)
    trainer.run()
    losses = [read_metrics(workdir)[s]["loss"] for s in range(1, STEPS + 1)]
    return np.array(losses), trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    losses, _ = _run(tmp_path_factory.mktemp("one"), (1, 1, 1), jax.devices()[:1])
    return losses


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 1, 4)],
                         ids=["data", "fsdp", "tensor"])
def test_sharded_run_matches_one_device(tmp_path, reference, shape):
    losses, trainer = _run(tmp_path, shape)
    assert losses[-1] < losses[0]  # it trains
    np.testing.assert_allclose(losses, reference, rtol=2e-5)
    kernel = trainer.shardings.params["decoder"]["layers_0"]["mlp"]["intermediate"]["kernel"]
    _, fsdp, tensor = shape  # (d_model, d_ff) = (64, 256): embed over fsdp, mlp over tensor
    assert kernel.shard_shape((64, 256)) == (64 // fsdp, 256 // tensor)
