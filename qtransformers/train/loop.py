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
from qtransformers import evals as evals_lib
from qtransformers.evals.block_outliers import OutlierEvalFn
from qtransformers.models.tasks import get_task
from qtransformers.train.config import check_vocab, validate_config, validate_for_devices
from qtransformers.train.optimizer import make_optimizer
from qtransformers.train.state import (TrainState, all_finite, make_init_fn,
                                       state_shardings, with_shardings)
from qtransformers.train.step import make_train_step
from qtransformers.train.workdir_lock import WorkdirLock, check_workdir_writable
from qtransformers.train.writers import MetricWriter, Throughput

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN / inf loss or state; the last good checkpoint is kept."""


class Trainer:
    """Builds everything from a validated config; `run()` trains to config.train.num_steps."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 outlier_eval_fn: OutlierEvalFn | None = None,
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
        self.task = get_task(self.model_cfg)
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
        self.evaluators = evals_lib.build_evaluators(evals_lib.train_evals(config), self.task)
        for evaluator in self.evaluators.values():
            if hasattr(evaluator, "block_fn"):  # a custom block-view hook
                evaluator.block_fn = outlier_eval_fn
        self._check_evaluators()
        self.eval_models = evals_lib.evaluation_models(self.model_cfg, self.model)
        self.eval_data = TrainerEvalData(config, self.task, self.mesh, self.tokenizer, workdir)
        self.checkpointer = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"), train.checkpoint_every, train.keep_checkpoints,
            train.async_checkpoint)
        self._compile()

    def _compile(self) -> None:
        """Jits init / train steps with shardings from the current mesh."""
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
    def run_evaluators(self, params: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
        """{name: result} of the config's evaluators (all, or `names`) on `params`."""
        chosen = {n: e for n, e in self.evaluators.items() if names is None or n in names}
        with mesh_lib.sharding_context(self.mesh, self.rules):
            return evals_lib.run_evaluators(chosen, self.eval_models, params, self.eval_data)

    def evaluate(self, params: Any) -> dict[str, float]:
        """Loss / accuracy / perplexity of the 'eval' evaluator (train.eval_steps batches)."""
        return self.run_evaluators(params, ["eval"])["eval"]

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
                    evaluate = any(e.due(step, last) for e in self.evaluators.values())
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
        """The evaluators due at `step`, written to the logs (split = the evaluator's name);
        returns their scalars for the result: an fp evaluator's flattened as '<name>_<metric>'
        (evals.eval -> 'eval_loss'), the others' nested under the name."""
        due = [name for name, e in self.evaluators.items() if e.due(step, last)]
        out: dict[str, Any] = {}
        for name, result in self.run_evaluators(params, due).items():
            evaluator = self.evaluators[name]
            scalars = evaluator.scalars(result)
            writer.write(step, name, scalars)
            if self.is_chief:
                logger.info("%s step %d | %s", name, step, evaluator.summary(result))
            if evaluator.type_name == "fp":
                out.update({f"{name}_{k}": v for k, v in scalars.items()})
            else:
                out[name] = scalars
        return out

    def _check_evaluators(self) -> None:
        """PTQ evaluators read process-local calibration batches: one process only."""
        quant = [n for n, e in self.evaluators.items() if e.type_name in ("ptq", "sensitivity")
                 and e.every > 0]
        if quant and jax.process_count() > 1:
            raise ValueError(f"evals {quant} (PTQ) run in single-process training only; set "
                             "their every=0 and run `qtransformers evaluate` on the checkpoint.")

    def _throughput(self) -> Throughput:
        cfg, train, task = self.model_cfg, self.config.train, self.task
        tokens = task.tokens_per_example(cfg, self.seq_len)
        per_token = flops.flops_per_token(cfg, tokens)
        device = jax.devices()[0]
        peak = flops.peak_flops_per_device(device.device_kind, device.platform,
                                           train.compute_dtype)
        items = train.global_batch_size * task.items_per_example(cfg, self.seq_len)
        return Throughput(items, per_token * tokens * train.global_batch_size,
                          jax.device_count(), peak, train.num_steps, task.item_unit)

    def _nan_message(self, step: int, metrics: dict[str, float] | None) -> str:
        what = (f"loss={metrics['loss']}, grad_norm={metrics['grad_norm']}" if metrics
                else "non-finite parameters")
        return (f"training diverged at step {step} ({what}); stopping. The last good checkpoint "
                f"is step {self.checkpointer.latest_step()} in {self.checkpointer.directory}. "
                "Lower optim.lr, raise optim.warmup_steps or set optim.clip_norm.")


class TrainerEvalData(evals_lib.DataConfigEvalData):
    """The trainer's batches for its evaluators: global, mesh-sharded eval batches padded to
    the eval batch size (inputs.eval_batches); calibration batches as every other path reads
    them (evals.DataConfigEvalData); per-sample outputs replicated (multi-host readable)."""

    def __init__(self, config: ml_collections.ConfigDict, task: Any, mesh: jax.sharding.Mesh,
                 tokenizer: Any, workdir: str):
        super().__init__(task, config.data,
                         config.train.eval_batch_size or config.train.global_batch_size,
                         workdir, tokenizer)
        self.config, self.mesh = config, mesh
        self.out_sharding = mesh_lib.replicated(mesh)

    def _eval_batches(self, num_batches: int, batch_size: int) -> Any:
        return inputs.eval_batches(self.config, num_batches, self.mesh, self.tokenizer,
                                   self.workdir, batch_size)


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
                       outlier_eval_fn: OutlierEvalFn | None = None,
                       devices: Sequence[jax.Device] | None = None,
                       allow_changed: Sequence[str] = ()) -> dict[str, Any]:
    """Trains (resuming from workdir/checkpoints when present) and evaluates.

    Args:
      config: the experiment config (see qtransformers.train.config.base_config).
      workdir: checkpoints/, metrics.jsonl, tensorboard/ and config.json go here.
      outlier_eval_fn: (model, family, params, batch) -> {name: (B,) per-sample values}: the
        block-view hook of the 'outliers' / 'block_outliers' evaluators (default: per-layer
        kurtosis / inf-norm of the block outputs, evals.block_outliers).
      devices: run on these local devices only (single process; default all devices).
      allow_changed: identity fields (only 'train.num_steps') that may differ from the
        workdir's config.json; any other difference raises UserError before any work.
    Returns:
      {'step', 'loss', 'accuracy', 'grad_norm', 'learning_rate', 'eval_loss',
       'eval_accuracy', 'eval_perplexity', 'outliers': {...}, <evaluator name>: {...},
       'preempted'?} (the evaluators of config.evals / train.*_every, see evals.train_evals).
    Raises:
      ValueError: a bad config (before any work). NonFiniteLossError: a NaN / inf loss.
    """
    return Trainer(config, workdir, outlier_eval_fn, devices, allow_changed).run()
