"""Orbax checkpoints of the train state + data iterator state, preemption handling, fallback
restore past corrupt checkpoints."""
from __future__ import annotations

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
