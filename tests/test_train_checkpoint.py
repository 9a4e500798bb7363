"""Checkpoints: kill -9 + resume reproduces the uninterrupted run, SIGTERM saves the current
step, a corrupt newest checkpoint falls back to the previous one (on another topology), and a
NaN loss stops with an error while the last good checkpoint remains."""
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qtransformers import cli
from qtransformers.train.config import load_config_file
from qtransformers.train.loop import NonFiniteLossError, train_and_evaluate
from qtransformers.train.writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_opt.py")
# Shared by the in-process and the command-line runs: a fast 1-block model, logs every step.
STEPS = 60
OVERRIDES = {"data.seq_len": 32, "model.num_layers": 1, "train.log_every": 1,
             "train.num_steps": STEPS, "train.eval_every": 0, "train.outlier_eval_every": 0,
             "train.keep_checkpoints": 5}


def _config(**overrides):
    config = load_config_file(CONFIG, "gated")
    for key, value in {**OVERRIDES, **overrides}.items():
        section, *rest = key.split(".")
        node = config[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    return config


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache shared by this module's command-line runs (same programs)."""
    return str(tmp_path_factory.mktemp("xla_cache"))


def _cli(workdir, cache, **overrides):
    args = [sys.executable, "-m", "qtransformers.train.main", f"--config={CONFIG}:gated",
            f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finalized_steps(workdir):
    """Checkpoint steps orbax has finalized (their directory renamed from the tmp name)."""
    paths = glob.glob(os.path.join(workdir, "checkpoints", "*"))
    return sorted(int(os.path.basename(p)) for p in paths if os.path.basename(p).isdigit())


def _wait_for(predicate, process, timeout=120.0):
    start = time.time()
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"run ended early ({process.returncode}): "
                                 f"{process.stderr.read()[-2000:]}")
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def _losses(workdir, steps):
    metrics = read_metrics(workdir)
    return np.array([metrics[s]["loss"] for s in steps])


def _rows(workdir):
    """metrics.jsonl's rows in file order, without the timing fields (rates, ETA, MFU)."""
    timing = ("step_time", "tokens_per_sec", "eta_sec", "mfu")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def test_kill9_then_resume_matches_uninterrupted_run(tmp_path, compile_cache, capfd):
    reference = str(tmp_path / "reference")
    run = _cli(reference, compile_cache, **{"train.checkpoint_every": 0})
    assert run.wait(timeout=300) == 0, run.stderr.read()[-2000:]
    workdir = str(tmp_path / "killed")
    # synchronous saves: the first checkpoint appears while the run waits for it
    args = {"train.checkpoint_every": 20, "train.async_checkpoint": False}
    run = _cli(workdir, compile_cache, **args)
    _wait_for(lambda: _finalized_steps(workdir), run)
    run.send_signal(signal.SIGSTOP)  # freeze it mid-run: its lock is live
    try:
        # a second trainer on the same workdir refuses with one line, touching nothing
        metrics_before = open(os.path.join(workdir, "metrics.jsonl")).read()
        capfd.readouterr()
        argv = ["train", f"--config={CONFIG}:gated", f"--workdir={workdir}"]
        argv += [f"--config.{k}={v}" for k, v in {**OVERRIDES, **args}.items()]
        assert cli.main(argv) == 2
        err = capfd.readouterr().err.strip()
        assert "\n" not in err and f"pid {run.pid}" in err and "in use" in err, err
        assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics_before
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert run.returncode == -signal.SIGKILL
    assert max(read_metrics(workdir)) < STEPS, "the run finished before it was killed"
    assert os.path.exists(os.path.join(workdir, "train.lock"))  # left behind by kill -9
    resumed = _cli(workdir, compile_cache, **args)  # takes the dead run's lock over
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert not os.path.exists(os.path.join(workdir, "train.lock"))
    # every step once, in order, and the same rows as the uninterrupted run
    rows, reference_rows = _rows(workdir), _rows(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r.keys() for r in rows] == [r.keys() for r in reference_rows]
    for row, ref in zip(rows, reference_rows):
        assert row["split"] == ref["split"]
        for key, value in ref.items():
            if key != "split":
                np.testing.assert_allclose(row[key], value, rtol=1e-6,
                                           err_msg=f"{key} at step {ref['step']}")


def test_sigterm_saves_the_current_step(tmp_path, compile_cache):
    workdir = str(tmp_path / "run")
    run = _cli(workdir, compile_cache, **{"train.checkpoint_every": 0})  # only SIGTERM saves
    _wait_for(lambda: len(read_metrics(workdir)) >= 3, run)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 0, run.stderr.read()[-2000:]
    saved = _finalized_steps(workdir)
    assert saved == [max(read_metrics(workdir))] and 3 <= saved[0] < STEPS
    assert (f"qtransformers train: preempted at step {saved[0]}, rerun the same command to "
            "continue.") in run.stderr.read()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back_on_a_smaller_mesh(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_config(**{"train.num_steps": 4, "train.checkpoint_every": 2}), workdir)
    assert _finalized_steps(workdir) == [2, 4]
    first_run = _losses(workdir, [3, 4])
    for path in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "d", "*")):
        with open(path, "r+b") as f:  # garble the array data of the newest checkpoint
            f.write(b"\0garbage\0" * 8)
    one_device = _config(**{"train.num_steps": 6, "train.checkpoint_every": 2,
                            "mesh.shape.data": 1})
    with caplog.at_level(logging.WARNING):
        final = train_and_evaluate(one_device, workdir, devices=jax.devices()[:1],
                                   allow_changed=["train.num_steps"])
    assert "checkpoint step 4" in caplog.text and "does not restore" in caplog.text
    assert final["step"] == 6 and _finalized_steps(workdir) == [2, 4, 6]
    # restored step 2 (saved on 8 devices) on 1 device and retrained steps 3, 4 identically
    np.testing.assert_allclose(_losses(workdir, [3, 4]), first_run, rtol=2e-5)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    # lr 1e30 leaves finite (huge) parameters after step 1; step 2's loss overflows.
    config = _config(**{"train.num_steps": 5, "train.checkpoint_every": 1, "optim.lr": 1e30,
                        "optim.schedule": "constant", "optim.warmup_steps": 0})
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*last good checkpoint is step 1"):
        train_and_evaluate(config, workdir)
    assert _finalized_steps(workdir) == [1]
