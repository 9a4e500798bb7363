"""Multi-process start-up: a clear error for an unreachable coordinator, and a two-process CPU
run (gloo collectives on 127.0.0.1) that matches the single-process run."""
import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from qtransformers.evaluate.checkpoints import restore_trainer_workdir
from qtransformers.train.config import load_config_file
from qtransformers.train.loop import train_and_evaluate
from qtransformers.train.mesh import DistributedInitError, maybe_initialize_distributed
from qtransformers.train.writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_opt.py")
OVERRIDES = {"data.seq_len": 32, "model.num_layers": 1, "train.num_steps": 4,
             "train.log_every": 1, "train.eval_every": 4, "train.outlier_eval_every": 4,
             "train.checkpoint_every": 4, "mesh.shape.fsdp": 2}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_raises_a_clear_error():
    dist = ml_collections.ConfigDict(dict(
        coordinator_address=f"127.0.0.1:{_free_port()}", num_processes=2, process_id=1,
        initialization_timeout=1))
    with pytest.raises(DistributedInitError, match="not reachable within distributed"):
        maybe_initialize_distributed(dist)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    workdir = str(tmp_path / "two")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for process_id in (0, 1):
        args = [sys.executable, "-m", "qtransformers.train.main", f"--config={CONFIG}:gated",
                f"--workdir={workdir}", f"--config.distributed.coordinator_address={address}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={process_id}",
                "--config.distributed.initialization_timeout=60"]
        args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
        runs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    finals = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert finals[0] == finals[1]  # every process sees the same (replicated) metrics
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))

    config = load_config_file(CONFIG, "gated")  # the same global mesh in one process
    for key, value in OVERRIDES.items():
        section, *rest = key.split(".")
        node = config[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    single = str(tmp_path / "one")
    final = train_and_evaluate(config, single)
    two, one = read_metrics(workdir), read_metrics(single)
    np.testing.assert_allclose([two[s]["loss"] for s in range(1, 5)],
                               [one[s]["loss"] for s in range(1, 5)], rtol=2e-5)
    np.testing.assert_allclose(finals[0]["eval_loss"], final["eval_loss"], rtol=2e-5)

    # The checkpoint written by the two processes restores in this single process.
    _, params_two, _ = restore_trainer_workdir(workdir)
    _, params_one, _ = restore_trainer_workdir(single)
    flat_two = jax.tree_util.tree_leaves_with_path(params_two)
    assert len(flat_two) == len(jax.tree_util.tree_leaves(params_one)) > 0
    for (path, a), b in zip(flat_two, jax.tree_util.tree_leaves(params_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))

    # ...and the trainer resumes it in one process exactly as it resumes the one-process run.
    config.train.num_steps = 6  # a longer run: an allowed change of the run's identity
    for run_dir in (workdir, single):
        train_and_evaluate(config, run_dir, allow_changed=["train.num_steps"])
    two, one = read_metrics(workdir), read_metrics(single)
    np.testing.assert_allclose([two[s]["loss"] for s in (5, 6)],
                               [one[s]["loss"] for s in (5, 6)], rtol=2e-5)
