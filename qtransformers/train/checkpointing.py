"""Orbax checkpoints of the train state + data iterator state, preemption handling, fallback
restore past corrupt checkpoints."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from qtransformers import fileio
from qtransformers.commandline import UserError

logger = logging.getLogger(__name__)

_CORRUPT_README = ("Checkpoint steps that did not restore, moved here by qtransformers so that "
                   "training could save those steps again.\n")


def gather_data_states(state: Any) -> dict[str, Any]:
    """{'states': [state of process 0, 1, ...]}: every process's iterator state (they differ
    for streamed sources), since only the primary process writes the JSON item."""
    if jax.process_count() == 1:
        return {"states": [state]}
    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:encoded.size] = encoded
    rows = multihost_utils.process_allgather(padded)
    return {"states": [json.loads(bytes(row[:int(n)]).decode())
                       for row, n in zip(np.asarray(rows), np.asarray(lengths).reshape(-1))]}


def local_data_state(saved: dict[str, Any]) -> Any:
    """This process's iterator state from `gather_data_states`' record.

    Raises ValueError when the process count changed and the per-process states differ.
    """
    states = saved["states"]
    if len(states) == jax.process_count():
        return states[jax.process_index()]
    if all(state == states[0] for state in states):
        return states[0]
    raise ValueError(f"the checkpoint holds data iterator states of {len(states)} processes that "
                     f"differ (a streamed source); resume with {len(states)} processes, not "
                     f"{jax.process_count()}.")


def param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"['decoder']['layers_0']...": shape} of a parameter tree's array leaves (arrays,
    ShapeDtypeStructs or orbax array metadata)."""
    from flax.core import meta
    leaves = jax.tree_util.tree_flatten_with_path(meta.unbox(tree))[0]  # nn.Partitioned boxes
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves
            if hasattr(leaf, "shape")}


def describe_mismatch(saved: dict[str, tuple[int, ...]],
                      wanted: dict[str, tuple[int, ...]]) -> str | None:
    """The first difference between saved and wanted parameter shapes (param_shapes dicts), in
    words, or None when they agree."""
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved:
            return f"parameter {name} is not in the checkpoint"
        if name not in wanted:
            return f"the checkpoint has parameter {name}, which the configured model lacks"
        if saved[name] != wanted[name]:
            return (f"parameter {name} has shape {saved[name]} in the checkpoint, "
                    f"{wanted[name]} in the configured model")
    return None


class Checkpointer:
    """Saves {'state': TrainState pytree, 'data': iterator state (JSON)} every `every` steps
    under `directory`, keeps the newest `keep`, optionally asynchronously.

    `restore_latest` restores onto the shardings of the target (the current mesh), so a
    checkpoint written on 8 devices restores on 1; a step that fails to restore (corrupt or
    partial files) is skipped with a warning and the next older one is tried. Orbax never lists
    un-finalized (tmp) steps.
    """

    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
        self.directory = fileio.absolute(directory)  # gs://... stays as it is
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(every, 1), max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True)
        self.every = every
        self._metadata_manager: Any = None
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def all_steps(self) -> list[int]:
        """Finalized checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalized step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """True at the configured interval (every=0 saves only on force)."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_state: Any) -> None:  # all processes call it
        """Starts saving `step` now (async unless configured otherwise); the caller decides when."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(gather_data_states(data_state)))
        self.manager.save(step, args=args, force=True)

    def restore_latest(self, target: Any) -> tuple[int, Any, Any] | None:
        """(step, state, data_state) from the newest checkpoint that restores, else None.

        Steps that fail to restore are moved to `<directory>_corrupt/` (so training can save
        those step numbers again) after a warning. A readable step whose parameters have other
        names or shapes than the target (a checkpoint of another model) raises UserError and is
        left where it is.

        Args:
          target: the abstract state (ShapeDtypeStructs with shardings on the current mesh).
        """
        failed, result = [], None
        for step in reversed(self.all_steps()):
            mismatch = self.params_mismatch(step, target)
            if mismatch:  # a readable checkpoint of another model: not corrupt, never moved
                raise UserError(
                    f"checkpoint step {step} in {self.directory} holds another model than the "
                    f"config ({mismatch}); train this config in a new --workdir, or resume with "
                    "the config that wrote it.")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
            except Exception as err:  # orbax / tensorstore raise many types on bad files
                message = str(err).splitlines()[0][:300] if str(err) else ""
                logger.warning("checkpoint step %d in %s does not restore (%s: %s); trying the "
                               "previous one.", step, self.directory, type(err).__name__, message)
                failed.append(step)
                continue
            result = step, restored["state"], local_data_state(restored["data"])
            break
        if failed:
            self._quarantine(failed)
        return result

    def params_mismatch(self, step: int, target: Any) -> str | None:
        """How the parameters saved at `step` differ in names or shapes from `target.params`
        (first difference), or None when they agree or the metadata cannot be read (a corrupt
        step: restoring it fails and quarantines it)."""
        try:
            if self._metadata_manager is None:
                self._metadata_manager = ocp.CheckpointManager(
                    self.directory, options=ocp.CheckpointManagerOptions(create=False),
                    item_handlers={"state": ocp.StandardCheckpointHandler(),
                                   "data": ocp.JsonCheckpointHandler()})
            saved = self._metadata_manager.item_metadata(step)["state"]["params"]
            saved_shapes = param_shapes(saved)
        except Exception:  # unreadable metadata: let the restore decide (corrupt)
            return None
        return describe_mismatch(saved_shapes, param_shapes(target.params))

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unrestorable step directories out of the manager's directory."""
        if jax.process_index() == 0:
            target_dir = self.directory + "_corrupt"
            fileio.makedirs(target_dir)
            if fileio.is_remote(target_dir):  # an object-store folder exists only with a file
                fileio.write_text(os.path.join(target_dir, "README.txt"), _CORRUPT_README)
            for step in steps:
                destination = os.path.join(target_dir, f"{step}-{int(time.time())}")
                fileio.move(os.path.join(self.directory, str(step)), destination)
                logger.warning("moved unrestorable checkpoint step %d to %s", step, destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("qtransformers_checkpoint_quarantine")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True when a multi-host preemption notice reached this step on every host."""
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except Exception:  # no distributed runtime / preemption service in this process
            return False

    def wait_until_finished(self) -> None:
        """Blocks until pending async saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
        if self._metadata_manager is not None:
            self._metadata_manager.close()


class PreemptionFlag:
    """Sets `requested` on SIGTERM (and restores the previous handler on `uninstall`), so the
    train loop can save the current step and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        logger.warning("received signal %d; saving a checkpoint and stopping.", signum)
        self.requested = True

    def install(self) -> "PreemptionFlag":
        """Installs the SIGTERM handler (only possible from the main thread)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        """Puts the previous SIGTERM handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ---------------------------------------------------------------- a run's layout, read back
class RunRestoreError(UserError):
    """A trainer workdir that cannot be read back; the message names the path and the way out.
    (A UserError, itself a ValueError: commands print it as one line and exit 2.)"""


class NotARunError(RunRestoreError):
    """The folder has no trainer config.json (or not a valid one)."""


class NoCheckpointError(RunRestoreError):
    """No finalized checkpoint, or none that restores."""


class CheckpointMismatchError(RunRestoreError):
    """A checkpoint holds another model than the workdir's config.json."""


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A trainer run read back by restore_run.

    model_cfg: the ModelConfig it trained (config.json 'resolved_model'); params: the newest
    checkpoint's params that restore (on this process's first device); step: that checkpoint's
    step; config: the run's experiment config as recorded (config.json 'config', a dict);
    workdir: the folder.
    """

    model_cfg: Any
    params: Any
    step: int
    config: dict
    workdir: str


def run_layout(workdir: str) -> dict[str, str]:
    """The files of a trainer workdir: {'config': config.json, 'checkpoints': its orbax folder,
    'metrics': metrics.jsonl}."""
    return {"config": os.path.join(workdir, "config.json"),
            "checkpoints": os.path.join(fileio.absolute(workdir), "checkpoints"),
            "metrics": os.path.join(workdir, "metrics.jsonl")}


def read_run_model(workdir: str) -> tuple[Any, dict]:
    """(ModelConfig, the whole config.json record) of a trainer workdir; NotARunError when
    config.json is missing, not JSON or has no valid 'resolved_model'."""
    from qtransformers.models.config import ModelConfig
    path = run_layout(workdir)["config"]
    if not fileio.isfile(path):
        raise NotARunError(f"{workdir} is not a trainer workdir (no config.json); give the "
                           "folder `qtransformers train --workdir` wrote.")
    try:
        record = json.loads(fileio.read_text(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise NotARunError(f"{path} is not valid JSON ({err}); restore it or point at another "
                           "workdir.") from err
    try:
        return ModelConfig.from_dict(record["resolved_model"]), record
    except (KeyError, TypeError, ValueError) as err:
        raise NotARunError(f"{workdir}/config.json has no valid 'resolved_model' ({err}); it is "
                           "not a trainer workdir's config.") from err


def abstract_params(model_cfg: Any) -> Any:
    """The parameter shapes (ShapeDtypeStructs, no compute) of model_cfg's model."""
    from qtransformers.models import build_model
    from qtransformers.models.tasks import get_task
    model, task = build_model(model_cfg), get_task(model_cfg)
    args, kwargs = task.model_inputs(task.example_batch(model_cfg, min(8, model_cfg.max_len)))
    return jax.eval_shape(lambda key: model.init(key, *args, deterministic=True,
                                                 **kwargs)["params"], jax.random.PRNGKey(0))


def restore_run(workdir: str) -> RestoredRun:
    """The model config, params, step and config of a trainer workdir's newest checkpoint that
    restores: the one reader of the layout the trainer writes (config.json + checkpoints/).

    A step that does not restore (corrupt or partial files) is skipped with a warning on stderr
    and the previous one is tried, as the trainer does (nothing is moved: this only reads).
    Raises:
      NotARunError: no valid config.json. NoCheckpointError: no checkpoint, or none restores.
      CheckpointMismatchError: the checkpoints hold another model than config.json.
    """
    import sys
    model_cfg, record = read_run_model(workdir)
    ckpt_dir = run_layout(workdir)["checkpoints"]
    if not fileio.isdir(ckpt_dir):
        raise NoCheckpointError(f"{workdir}: no finalized checkpoint under {ckpt_dir} (no such "
                                "folder); let the run save one (train.checkpoint_every) or give "
                                "another folder")
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False),
                                    item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                   "data": ocp.JsonCheckpointHandler()})
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise NoCheckpointError(f"{workdir}: no finalized checkpoint under {ckpt_dir}; let the "
                                "run save one (train.checkpoint_every) or give another folder")
    wanted = param_shapes(abstract_params(model_cfg))
    # Restore onto this process's first device whatever mesh wrote the checkpoint (a checkpoint
    # from a multi-host run carries device ids that do not exist here).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    failures = []
    for step in steps:
        try:
            metadata = manager.item_metadata(step)["state"]
            saved_params = metadata["params"]
        except Exception as err:  # orbax raises many types on unreadable metadata
            failures.append(f"step {step}: {type(err).__name__}: {str(err)[:120]}")
            continue
        mismatch = describe_mismatch(param_shapes(saved_params), wanted)
        if mismatch:
            raise CheckpointMismatchError(
                f"{workdir}: checkpoint step {step} holds another model than the workdir's "
                f"config.json ({mismatch}); the workdir was mixed up: give a workdir whose "
                "config.json made its checkpoints")
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
            if hasattr(m, "shape") else m, metadata)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
        except Exception as err:  # corrupt / partial files: fall back to the previous step
            failures.append(f"step {step}: {type(err).__name__}: {str(err)[:120]}")
            continue
        if failures:
            print(f"warning: newer checkpoints in {ckpt_dir} do not restore ("
                  + "; ".join(failures) + f"); evaluating checkpoint step {step}.",
                  file=sys.stderr)
        state = restored["state"]
        params = state["params"] if isinstance(state, dict) else state.params
        return RestoredRun(model_cfg, params, int(step), record.get("config", {}), workdir)
    raise NoCheckpointError(f"{workdir}: no checkpoint under {ckpt_dir} restores ("
                            + "; ".join(failures) + ")")
