"""train_and_evaluate: the training loop (sharded steps, evaluation, checkpoints, logs)."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from qtransformers import fileio
from qtransformers.models.registry import build_model
from qtransformers.train import checkpointing, flops, inputs, run_identity
from qtransformers.train import mesh as mesh_lib
from qtransformers.train import outliers as outliers_lib
from qtransformers.train.config import check_vocab, validate_config, validate_for_devices
from qtransformers.train.objectives import finalize_metrics
from qtransformers.train.optimizer import make_optimizer
from qtransformers.train.state import (TrainState, all_finite, make_init_fn,
                                       state_shardings, with_shardings)
from qtransformers.train.step import SUM_KEYS, make_eval_step, make_train_step
from qtransformers.train.workdir_lock import WorkdirLock, check_workdir_writable
from qtransformers.train.writers import MetricWriter, Throughput

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN / inf loss or state; the last good checkpoint is kept."""


class Trainer:
    """Builds everything from a validated config; `run()` trains to config.train.num_steps."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 outlier_eval_fn: outliers_lib.OutlierEvalFn | None = None,
                 devices: Sequence[jax.Device] | None = None,
                 allow_changed: Sequence[str] = ()):
        self.model_cfg = validate_config(config)
        fileio.check_remote_support(workdir)  # gs:// without gcsfs: a clear error, not orbax's
        allow_changed = run_identity.check_allow_changed(allow_changed)
        mesh_lib.maybe_initialize_distributed(config.distributed)
        self.mesh = mesh_lib.make_mesh(config.mesh.shape, devices)
        validate_for_devices(config, tuple(self.mesh.shape.values()), jax.process_count())
        self.config, self.workdir = config, workdir
        self.is_chief = jax.process_index() == 0
        # The workdir: the same run (or an allowed change), not locked by a live trainer,
        # writable; all checked before anything is written there.
        self.previous_record = run_identity.read_run_record(workdir)
        self.changed_fields = run_identity.check_resume(workdir, config, self.model_cfg,
                                                        allow_changed)
        self.lock = WorkdirLock(workdir)
        if self.is_chief:
            self.lock.check()
            check_workdir_writable(workdir)
        self.rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
        self.family = self.model_cfg.family
        vocab = inputs.data_vocab_size(config, workdir)
        if vocab is not None:
            check_vocab(vocab, self.model_cfg)
        self.tokenizer = inputs.build_tokenizer(config, workdir)
        self.model = build_model(self.model_cfg)
        train = config.train
        self.tx, self.schedule = make_optimizer(config.optim, train.num_steps)
        self.seq_len = config.data.seq_len
        self.abstract, self.shardings = state_shardings(
            self.model, self.model_cfg, self.tx, self.seq_len, self.mesh, self.rules)
        self.outlier_eval_fn = outlier_eval_fn or outliers_lib.default_outlier_eval_fn
        self.checkpointer = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"), train.checkpoint_every, train.keep_checkpoints,
            train.async_checkpoint)
        self._compile()

    def _compile(self) -> None:
        """Jits init / train / eval / outlier steps with shardings from the current mesh."""
        replicated = mesh_lib.replicated(self.mesh)
        init = make_init_fn(self.model, self.model_cfg, self.tx, self.seq_len)
        self.init_fn = jax.jit(init, out_shardings=self.shardings)
        step = make_train_step(self.model, self.family, self.tx, self.schedule,
                               self.config.optim.grad_accum_steps, self.mesh, self.rules,
                               self.config.train.mlm_max_predictions)
        # One prefix sharding for every batch array: rows over the data-parallel axes.
        batch_sharding = mesh_lib.batch_sharding(self.mesh, self.rules, 1)
        self.train_step = jax.jit(step, in_shardings=(self.shardings, batch_sharding),
                                  out_shardings=(self.shardings, replicated),
                                  donate_argnums=(0,))
        self.eval_step = jax.jit(make_eval_step(self.model, self.family),
                                 out_shardings=replicated)
        fn, model, family = self.outlier_eval_fn, self.model, self.family
        # Per-sample values and the real-row mask come back replicated (multi-host readable).
        self.outlier_step = jax.jit(
            lambda params, batch: (fn(model, family, params, batch), inputs.valid_rows(batch)),
            out_shardings=replicated)

    # ---------------------------------------------------------------- state & data
    def initial_state(self, train_iter: Any) -> TrainState:
        """The newest restorable checkpoint (and iterator position), else a fresh init."""
        restored = self.checkpointer.restore_latest(with_shardings(self.abstract,
                                                                   self.shardings))
        if restored is None:
            return self.init_fn(jax.random.PRNGKey(self.config.train.seed))
        step, state, data_state = restored
        train_iter.set_state(data_state)
        logger.info("restored checkpoint step %d from %s", step, self.checkpointer.directory)
        return state

    def _global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return mesh_lib.global_batch(batch, self.mesh, self.rules,
                                     self.config.train.global_batch_size)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, params: Any) -> dict[str, float]:
        """Loss / accuracy / perplexity over train.eval_steps evaluation batches."""
        totals = {k: 0.0 for k in SUM_KEYS}
        with mesh_lib.sharding_context(self.mesh, self.rules):
            for batch in inputs.eval_batches(self.config, self.config.train.eval_steps,
                                             self.mesh, self.tokenizer, self.workdir):
                sums = jax.device_get(self.eval_step(params, batch))
                totals = {k: totals[k] + float(sums[k]) for k in SUM_KEYS}
        return finalize_metrics(totals)

    def evaluate_outliers(self, params: Any) -> dict[str, Any]:
        """Dataset means of the outlier hook's per-sample metrics, plus summaries."""
        sums: dict[str, float] = {}
        count = 0.0
        with mesh_lib.sharding_context(self.mesh, self.rules):
            for batch in inputs.eval_batches(self.config, self.config.train.outlier_eval_steps,
                                             self.mesh, self.tokenizer, self.workdir):
                values, valid = jax.device_get(self.outlier_step(params, batch))
                valid = np.asarray(valid, np.float64)
                for name, per_sample in values.items():
                    sums[name] = sums.get(name, 0.0) + float(np.sum(per_sample * valid))
                count += float(valid.sum())
        means = {k: v / max(count, 1.0) for k, v in sums.items()}
        return outliers_lib.summarize_outliers(means)

    # ---------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        """Trains until train.num_steps (or a SIGTERM / preemption notice); returns the last
        train metrics, eval metrics and outlier metrics."""
        if self.is_chief:
            self.lock.acquire()
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict[str, Any]:
        config, train = self.config, self.config.train
        train_iter = inputs.train_iterator(config, self.tokenizer, self.workdir)
        state = self.initial_state(train_iter)
        start = int(jax.device_get(state.step))
        # rows past the restored step were written by a run that died before its next
        # checkpoint; they are trained again now, so they are dropped (each step once).
        writer = MetricWriter(self.workdir, enabled=self.is_chief, keep_through_step=start)
        if self.is_chief:
            if self.changed_fields:
                logger.warning("continuing %s at step %d with changed %s (recorded in "
                               "config.json).", self.workdir, start, self.changed_fields)
            _write_config(self.workdir, config, self.model_cfg, self.previous_record,
                          self.changed_fields, start)
        throughput = self._throughput()
        preemption = checkpointing.PreemptionFlag()
        if jax.process_count() == 1:  # multi-host: jax's own preemption notifier owns SIGTERM
            preemption.install()
        final: dict[str, Any] = {"step": start}
        pending: tuple[int, Any] | None = None

        def flush() -> None:
            """Reads the pending step's metrics (one step late), checks them, logs them."""
            nonlocal pending
            if pending is None:
                return
            step, device_metrics = pending
            pending = None
            metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                raise NonFiniteLossError(self._nan_message(step, metrics))
            final.update({"step": step, **metrics})
            if step == start + 1:
                throughput.reset()
                throughput.update(step)  # the first step held compilation
            if step % train.log_every == 0 or step == train.num_steps:
                rates = throughput.update(step)
                metrics["perplexity"] = float(np.exp(min(metrics["loss"], 80.0)))
                writer.write(step, "train", {**metrics, **rates})
                if self.is_chief:
                    logger.info(throughput.line(step, metrics, rates))

        try:
            with mesh_lib.sharding_context(self.mesh, self.rules):
                for step in range(start + 1, train.num_steps + 1):
                    self.lock.heartbeat()
                    batch = self._global_batch(next(train_iter))
                    state, metrics = self.train_step(state, batch)
                    flush()
                    pending = (step, metrics)
                    stop = preemption.requested or self.checkpointer.reached_preemption(step)
                    last = step == train.num_steps
                    save = stop or self.checkpointer.should_save(step) or (
                        last and train.checkpoint_every > 0)  # 0: no checkpoints
                    evaluate = (_due(step, train.eval_every, last)
                                or _due(step, train.outlier_eval_every, last))
                    if save or evaluate:
                        flush()  # check (and log) this step before saving or pausing
                        paused = time.perf_counter()
                    if save:
                        if not bool(all_finite(state.params)):
                            raise NonFiniteLossError(self._nan_message(step, None))
                        self.checkpointer.save(step, state, train_iter.get_state())
                    if evaluate:
                        final.update(self._evaluate_due(step, last, state.params, writer))
                    if save or evaluate:
                        throughput.discount(time.perf_counter() - paused)
                    if stop:
                        logger.warning("stopping at step %d after a preemption request.", step)
                        final["preempted"] = True
                        break
                flush()
        finally:
            self.checkpointer.close()
            writer.close()
            if hasattr(train_iter, "close"):
                train_iter.close()
            preemption.uninstall()
        return final

    def _evaluate_due(self, step: int, last: bool, params: Any,
                      writer: MetricWriter) -> dict[str, Any]:
        """The evaluations due at `step`, written to the logs; returns them for the result."""
        train, out = self.config.train, {}
        if _due(step, train.eval_every, last):
            metrics = self.evaluate(params)
            writer.write(step, "eval", metrics)
            if self.is_chief:
                logger.info("eval step %d | loss %.4f | perplexity %.2f | accuracy %.4f", step,
                            metrics["loss"], metrics["perplexity"], metrics["accuracy"])
            out.update({f"eval_{k}": v for k, v in metrics.items()})
        if _due(step, train.outlier_eval_every, last):
            out["outliers"] = self.evaluate_outliers(params)
            writer.write(step, "outliers", out["outliers"])
            if self.is_chief:
                logger.info("outliers step %d | avg kurtosis %.2f | max inf-norm %.2f", step,
                            out["outliers"].get("avg_kurtosis", float("nan")),
                            out["outliers"].get("max_inf_norm", float("nan")))
        return out

    def _throughput(self) -> Throughput:
        cfg, train = self.model_cfg, self.config.train
        tokens = self.seq_len if self.family != "vit" else cfg.num_patches + 1
        per_token = flops.flops_per_token(cfg, tokens)
        device = jax.devices()[0]
        peak = flops.peak_flops_per_device(device.device_kind, device.platform,
                                           train.compute_dtype)
        items = train.global_batch_size * (tokens if self.family != "vit" else 1)
        return Throughput(items, per_token * tokens * train.global_batch_size,
                          jax.device_count(), peak, train.num_steps,
                          "images" if self.family == "vit" else "tokens")

    def _nan_message(self, step: int, metrics: dict[str, float] | None) -> str:
        what = (f"loss={metrics['loss']}, grad_norm={metrics['grad_norm']}" if metrics
                else "non-finite parameters")
        return (f"training diverged at step {step} ({what}); stopping. The last good checkpoint "
                f"is step {self.checkpointer.latest_step()} in {self.checkpointer.directory}. "
                "Lower optim.lr, raise optim.warmup_steps or set optim.clip_norm.")


def _due(step: int, every: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


def _write_config(workdir: str, config: ml_collections.ConfigDict, model_cfg: Any,
                  previous: dict[str, Any] | None = None, changed: Sequence[str] = (),
                  step: int = 0) -> None:
    """workdir/config.json: the run's config (local data paths made absolute, so that
    `qtransformers evaluate` finds the data from any directory), the resolved model, the run's
    fingerprint and the fields changed on resume (see run_identity.run_record)."""
    record = run_identity.run_record(config, model_cfg, previous, changed, step)
    fileio.makedirs(workdir)  # local or remote (gs://) workdir
    fileio.write_text(os.path.join(workdir, run_identity.CONFIG_FILE),
                      json.dumps(record, indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       outlier_eval_fn: outliers_lib.OutlierEvalFn | None = None,
                       devices: Sequence[jax.Device] | None = None,
                       allow_changed: Sequence[str] = ()) -> dict[str, Any]:
    """Trains (resuming from workdir/checkpoints when present) and evaluates.

    Args:
      config: the experiment config (see qtransformers.train.config.base_config).
      workdir: checkpoints/, metrics.jsonl, tensorboard/ and config.json go here.
      outlier_eval_fn: (model, family, params, batch) -> {name: (B,) per-sample values},
        averaged over train.outlier_eval_steps eval batches every train.outlier_eval_every
        steps (default: per-layer kurtosis / inf-norm of the block outputs).
      devices: run on these local devices only (single process; default all devices).
      allow_changed: identity fields (only 'train.num_steps') that may differ from the
        workdir's config.json; any other difference raises UserError before any work.
    Returns:
      {'step', 'loss', 'accuracy', 'grad_norm', 'learning_rate', 'eval_loss',
       'eval_accuracy', 'eval_perplexity', 'outliers': {...}, 'preempted'?}.
    Raises:
      ValueError: a bad config (before any work). NonFiniteLossError: a NaN / inf loss.
    """
    return Trainer(config, workdir, outlier_eval_fn, devices, allow_changed).run()
