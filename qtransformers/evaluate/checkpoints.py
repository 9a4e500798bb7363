"""Loading what `qtransformers evaluate` measures: a trainer workdir's newest checkpoint that
restores, a HuggingFace folder, a params file, or a random init of a model preset.

Every problem a user can fix raises UserError with one line naming the path and the way out.
"""
from __future__ import annotations

import json
import os
import sys
import types
from typing import Any

import jax
import numpy as np

from qtransformers import fileio
from qtransformers.commandline import UserError
from qtransformers.models import ModelConfig, build_model, get_model_config


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
    """`num` random batches of the model's task (uniform tokens / Gaussian images)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        if cfg.family == "vit":
            s = cfg.image_size
            out.append({"image": rng.standard_normal((batch_size, s, s, cfg.num_channels),
                                                     np.float32),
                        "label": rng.integers(0, cfg.num_classes, batch_size, np.int32)})
            continue
        ids = rng.integers(0, cfg.vocab_size, (batch_size, seq_len), np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if cfg.family == "opt":
            batch["targets"] = np.roll(ids, -1, axis=1)
            weights = np.ones((batch_size, seq_len), np.float32)
            weights[:, -1] = 0.0
        else:
            batch["token_type_ids"] = np.zeros_like(ids)
            batch["targets"] = ids.copy()
            weights = (rng.random((batch_size, seq_len)) < 0.15).astype(np.float32)
        batch["weights"] = weights
        out.append(batch)
    return out


def init_params(model_cfg: ModelConfig, seq_len: int = 8, abstract: bool = False) -> Any:
    """Randomly initialized params of the model (PRNGKey(0)); with abstract=True only their
    shapes (jax.eval_shape, no compute)."""
    model = build_model(model_cfg)
    batch = random_batches(model_cfg, 1, 1, min(seq_len, model_cfg.max_len), seed=0)[0]
    args_ = (batch["image"],) if model_cfg.family == "vit" else (
        batch["input_ids"], batch["attention_mask"])
    init = lambda key: model.init(key, *args_)["params"]  # noqa: E731
    if abstract:
        return jax.eval_shape(init, jax.random.PRNGKey(0))
    return jax.jit(init)(jax.random.PRNGKey(0))


def _check_params(params: Any, model_cfg: ModelConfig, source: str) -> None:
    """Raises UserError when params' names or shapes are not those of model_cfg's model."""
    from qtransformers.train.checkpointing import describe_mismatch, param_shapes
    mismatch = describe_mismatch(param_shapes(params),
                                 param_shapes(init_params(model_cfg, abstract=True)))
    if mismatch:
        raise UserError(f"--checkpoint {source} holds another model than {model_cfg.family} "
                        f"d_model={model_cfg.d_model} layers={model_cfg.num_layers} ({mismatch}); "
                        "give the matching --model / --method, or the right checkpoint.")


def restore_trainer_workdir(workdir: str) -> tuple[ModelConfig, Any, dict]:
    """(model config, params of the newest checkpoint that restores, run config) of a trainer
    workdir.

    A step that does not restore (corrupt or partial files) is skipped with a warning and the
    previous one is tried, as the trainer does (nothing is moved: evaluation only reads).
    Raises UserError when there is no checkpoint, none restores, or the checkpoints hold
    another model than the workdir's config.json.
    """
    import orbax.checkpoint as ocp
    meta = _read_json(os.path.join(workdir, "config.json"))
    try:
        # PTQ and the outlier tools read the (B, H, T, T) attention tensors: evaluate on the
        # materialised path, numerically the same as the blocked / fused one a run trained with.
        model_cfg = ModelConfig.from_dict(meta["resolved_model"]).replace(
            attention_impl="materialized")
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{workdir}/config.json has no valid 'resolved_model' ({err}); it is not "
                        "a trainer workdir's config.") from err
    ckpt_dir = os.path.join(fileio.absolute(workdir), "checkpoints")
    if not fileio.isdir(ckpt_dir):
        fail(f"--checkpoint {workdir}: no finalized checkpoint under {ckpt_dir} (no such "
              "folder); let the run save one (train.checkpoint_every) or give another folder")
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False),
                                    item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                   "data": ocp.JsonCheckpointHandler()})
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        fail(f"--checkpoint {workdir}: no finalized checkpoint under {ckpt_dir}; let the run "
              "save one (train.checkpoint_every) or give another folder")
    from qtransformers.train.checkpointing import describe_mismatch, param_shapes
    wanted = param_shapes(init_params(model_cfg, abstract=True))
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
            fail(f"--checkpoint {workdir}: checkpoint step {step} holds another model than the "
                  f"workdir's config.json ({mismatch}); the workdir was mixed up: give a "
                  "workdir whose config.json made its checkpoints")
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
        return model_cfg, params, meta.get("config", {})
    fail(f"--checkpoint {workdir}: no checkpoint under {ckpt_dir} restores ("
          + "; ".join(failures) + ")")


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

