"""Run identity: which config fields change the trained model, their fingerprint, and the check
that a workdir being resumed was made by the same run.

A workdir's config.json records the config that made it. Its *identity fields* are every field
that changes what is trained: the resolved model, the data (source, paths, tokenizer, packing,
...), the objective, the optimizer and its schedule length (train.num_steps), seeds, batch size
and compute dtype. Fields that only say how often to evaluate, checkpoint or log, and the device
layout (mesh, distributed), are free to change on resume. Of the identity fields only
train.num_steps may change on resume, and only when asked for (`--allow_changed=train.num_steps`):
the learning-rate schedule then follows the new length from the restored step on.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import ml_collections

from qtransformers import fileio
from qtransformers.commandline import UserError

CONFIG_FILE = "config.json"
# Fields that do not change the trained parameters (how often to evaluate / save / log, where
# the work runs, evaluation-only data settings).
FREE_FIELDS = frozenset({
    "train.log_every", "train.eval_every", "train.eval_steps", "train.eval_batch_size",
    "train.outlier_eval_every", "train.outlier_eval_steps", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint",
    "data.eval_split", "data.eval_max_documents", "data.eval_crop_fraction", "data.prefetch",
    "data.num_workers"})
FREE_SECTIONS = ("mesh", "distributed", "evals")
# Identity fields that `--allow_changed` may let a resumed run change.
CHANGEABLE_ON_RESUME = ("train.num_steps",)
_LOCAL_PATH_FIELDS = ("path", "eval_path", "tokenizer")


def saved_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json stores it: JSON types, local data paths made absolute (so
    `qtransformers evaluate` finds the data from any directory, and a relative path given from
    another directory is still the same data)."""
    saved = json.loads(config.to_json_best_effort())
    data = saved.get("data", {})
    for key in _LOCAL_PATH_FIELDS:
        value = data.get(key)
        if value and not fileio.is_remote(value) and os.path.exists(value):
            data[key] = os.path.abspath(value)
    return saved


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def identity_fields(saved: Mapping[str, Any], resolved_model: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """{'section.key': value} of every field that changes the trained model.

    Args:
      saved: a config in config.json form (`saved_config`).
      resolved_model: the ModelConfig dict the config resolves to (so a field set to its preset
        value is no change).
    """
    out: dict[str, Any] = {}
    for section, value in saved.items():
        if section in ("model",) + FREE_SECTIONS:
            continue
        _flatten(section, value, out)
    _flatten("model", dict(resolved_model), out)
    out["model.preset"] = saved.get("model", {}).get("preset")
    out["model.method"] = saved.get("model", {}).get("method")
    return {k: v for k, v in sorted(out.items()) if k not in FREE_FIELDS}


def fingerprint(fields: Mapping[str, Any]) -> str:
    """A short stable hash of identity fields (16 hex digits)."""
    text = json.dumps(dict(sorted(fields.items())), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_fields(config: ml_collections.ConfigDict, model_cfg: Any) -> dict[str, Any]:
    """identity_fields of a live config and its resolved ModelConfig."""
    return identity_fields(saved_config(config), model_cfg.to_dict())


def read_run_record(workdir: str) -> dict[str, Any] | None:
    """workdir/config.json, or None when the workdir has none.

    Raises UserError when the file exists but is not a trainer's config.json.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not fileio.exists(path):
        return None
    try:
        record = json.loads(fileio.read_text(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}), so this workdir's run cannot be "
                        "identified; use a new --workdir, or restore that file.") from err
    if not isinstance(record, dict) or "config" not in record or "resolved_model" not in record:
        raise UserError(f"{path} is not a qtransformers trainer config (no 'config' / "
                        "'resolved_model'); this folder holds something else: use a new "
                        "--workdir.")
    return record


def recorded_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """identity_fields of a config.json record."""
    return identity_fields(record["config"], record["resolved_model"])


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Field names whose values differ (a field missing on one side differs)."""
    missing = object()
    return sorted(k for k in set(old) | set(new)
                  if json.dumps(old.get(k, missing), default=str)
                  != json.dumps(new.get(k, missing), default=str))


def check_allow_changed(names: Sequence[str]) -> tuple[str, ...]:
    """Validates --allow_changed; returns the names. Raises UserError for other fields."""
    bad = [n for n in names if n not in CHANGEABLE_ON_RESUME]
    if bad:
        raise UserError(f"--allow_changed={','.join(names)}: {bad} cannot change on resume "
                        f"(only {', '.join(CHANGEABLE_ON_RESUME)} can); use a new --workdir to "
                        "train with other values.")
    return tuple(names)


def check_resume(workdir: str, config: ml_collections.ConfigDict, model_cfg: Any,
                 allow_changed: Sequence[str] = ()) -> list[str]:
    """Checks that `config` may continue the run in `workdir`; returns the allowed changed
    fields (empty for a new workdir or the same run).

    Raises UserError, naming each differing field with its old and new value and the ways out,
    when the workdir's config.json records another run.
    """
    record = read_run_record(workdir)
    if record is None:
        return []
    old, new = recorded_fields(record), config_fields(config, model_cfg)
    changed = differences(old, new)
    if not changed:
        return []
    blocked = [k for k in changed if k not in allow_changed]
    if not blocked:
        return changed
    shown = ", ".join(f"{k} {_show(old.get(k))} -> {_show(new.get(k))}" for k in blocked)
    fixable = all(k in CHANGEABLE_ON_RESUME for k in blocked)
    way_out = (f", or pass --allow_changed={','.join(blocked)} to continue this run with the new "
               "value" if fixable else "")
    raise UserError(f"--workdir={workdir} holds a run of another config ({shown}); nothing was "
                    f"changed. Train the new config in a new --workdir{way_out}.")


def run_record(config: ml_collections.ConfigDict, model_cfg: Any,
               previous: Mapping[str, Any] | None, changed: Sequence[str],
               step: int) -> dict[str, Any]:
    """The config.json content of a run: its config, resolved model, fingerprint, and the
    fields changed on earlier resumes ({'field', 'old', 'new', 'step'} each)."""
    fields = config_fields(config, model_cfg)
    history = list((previous or {}).get("changed_on_resume", []))
    if previous is not None and changed:
        old = recorded_fields(previous)
        history += [{"field": k, "old": old.get(k), "new": fields.get(k), "step": step}
                    for k in changed]
    record = {"config": saved_config(config), "resolved_model": model_cfg.to_dict(),
              "fingerprint": fingerprint(fields)}
    if history:
        record["changed_on_resume"] = history
    return record
