"""Loading what `qtransformers evaluate` measures: a trainer workdir's newest checkpoint that
restores, a HuggingFace folder, a params file, or a random init of a model preset.

Every problem a user can fix raises UserError with one line naming the path and the way out.
"""
from __future__ import annotations

import json
import os
import types
from typing import Any

import jax
import numpy as np

from qtransformers import fileio
from qtransformers.commandline import UserError
from qtransformers.models import ModelConfig, build_model, get_model_config
from qtransformers.evals.registry import for_evaluation
from qtransformers.models.tasks import get_task
from qtransformers.train.checkpointing import (abstract_params, describe_mismatch, param_shapes,
                                               restore_run)


def fail(message: str) -> None:
    """Raises UserError(message): one line on stderr and exit code 2 at the command."""
    raise UserError(message)


def _read_json(path: str) -> dict[str, Any]:
    """A JSON file (local or gs://); UserError naming it when it is not valid JSON."""
    try:
        return json.loads(fileio.read_text(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore it or point --checkpoint "
                        "elsewhere.") from err


def random_batches(cfg: ModelConfig, num: int, batch_size: int, seq_len: int,
                   seed: int) -> list[dict[str, np.ndarray]]:
    """`num` random batches of the model's task (Task.random_batches)."""
    return get_task(cfg).random_batches(cfg, num, batch_size, seq_len, seed)


def init_params(model_cfg: ModelConfig, seq_len: int = 8, abstract: bool = False) -> Any:
    """Randomly initialized params of the model (PRNGKey(0)); with abstract=True only their
    shapes (jax.eval_shape, no compute)."""
    if abstract:
        return abstract_params(model_cfg)
    model, task = build_model(model_cfg), get_task(model_cfg)
    args, kwargs = task.model_inputs(task.example_batch(model_cfg, min(seq_len,
                                                                       model_cfg.max_len)))
    init = lambda key: model.init(key, *args, **kwargs)["params"]  # noqa: E731
    return jax.jit(init)(jax.random.PRNGKey(0))


def _check_params(params: Any, model_cfg: ModelConfig, source: str) -> None:
    """Raises UserError when params' names or shapes are not those of model_cfg's model."""
    mismatch = describe_mismatch(param_shapes(params), param_shapes(abstract_params(model_cfg)))
    if mismatch:
        raise UserError(f"--checkpoint {source} holds another model than {model_cfg.family} "
                        f"d_model={model_cfg.d_model} layers={model_cfg.num_layers} ({mismatch}); "
                        "give the matching --model / --method, or the right checkpoint.")


def restore_trainer_workdir(workdir: str) -> tuple[ModelConfig, Any, dict]:
    """(model config on the materialised attention path, params, run config) of a trainer
    workdir: a thin alias of train.checkpointing.restore_run (raises its RunRestoreError
    subclasses, UserErrors)."""
    run = restore_run(workdir)
    return for_evaluation(run.model_cfg), run.params, run.config


def _read_params_file(path: str) -> Any:
    """The params of a .msgpack file or an orbax PyTree folder; UserError when it is neither."""
    try:
        if fileio.isdir(path):
            import orbax.checkpoint as ocp
            params = ocp.PyTreeCheckpointer().restore(fileio.absolute(path))
        else:
            from flax import serialization
            params = serialization.msgpack_restore(fileio.read_bytes(path))
    except Exception as err:  # msgpack / orbax raise many types on other files
        kind = "folder" if fileio.isdir(path) else "file"
        raise UserError(f"--checkpoint {path}: this {kind} is not a checkpoint (a trainer "
                        "workdir, a HuggingFace folder, a .msgpack params file or an orbax "
                        f"params folder): {type(err).__name__}: {str(err)[:160]}") from err
    params = params.get("params", params) if isinstance(params, dict) else params
    if not isinstance(params, dict) or not params:
        raise UserError(f"--checkpoint {path}: holds no parameter tree; give a .msgpack of the "
                        "params dict (flax.serialization.to_bytes).")
    return params


def load_source(args: types.SimpleNamespace) -> tuple[ModelConfig, Any, dict]:
    """(model config, params, trainer run config or {}) for the --checkpoint / --model flags."""
    path = args.checkpoint
    problem = fileio.remote_support_problem(path)
    if problem:
        fail(f"--checkpoint {problem}")
    if path and not fileio.exists(path):
        fail(f"--checkpoint {path!r} does not exist; give a trainer workdir, a HuggingFace "
              "folder or a params file")
    config_json = os.path.join(path, "config.json") if path else ""
    if path and fileio.isfile(config_json):
        meta = _read_json(config_json)
        if "resolved_model" in meta:
            return restore_trainer_workdir(path)
        if "model_type" not in meta:
            fail(f"--checkpoint {path}: its config.json is neither a trainer workdir's (no "
                  "'resolved_model') nor a HuggingFace model's (no 'model_type')")
        from qtransformers.convert import load_hf
        try:
            model_cfg, params = load_hf(path)
        except (ValueError, KeyError, OSError, ImportError) as err:
            raise UserError(f"--checkpoint {path}: HuggingFace folder does not load: "
                            f"{type(err).__name__}: {err}") from err
        return model_cfg, params, {}
    if not args.model:
        if path:
            fail(f"--checkpoint {path} is not a trainer workdir or HuggingFace folder (no "
                  "config.json); for a params file also pass --model PRESET [--method ...]")
        fail("pass --model PRESET (with a params file or for random init) or --checkpoint "
              "pointing at a trainer workdir / HF folder")
    try:
        model_cfg = get_model_config(args.model, args.method)
    except (KeyError, ValueError) as err:
        raise UserError(f"--model={args.model} --method={args.method}: {err}") from err
    if path:
        params = _read_params_file(path)
        _check_params(params, model_cfg, path)
        return model_cfg, params, {}
    return model_cfg, init_params(model_cfg, args.seq_len), {}

