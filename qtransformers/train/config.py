"""The experiment config (big_vision style): sections, defaults, preset arguments, validation.

Sections: model (ModelConfig fields as placeholders over `preset` + `method`), data (the data
layer's config), optim, train, mesh, distributed. `validate_config` checks all of it before any
work; `validate_for_devices` adds the checks that need the device and process counts.
"""
from __future__ import annotations

import math
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from qtransformers.evals.registry import build_evaluators, train_evals
from qtransformers.models.config import ModelConfig
from qtransformers.models.registry import MODEL_PRESETS, PAPER_METHODS, get_model_config
from qtransformers.nn.partitioning import DEFAULT_LOGICAL_AXIS_RULES
from qtransformers.train import inputs
from qtransformers.train.mesh import MESH_AXES
from qtransformers.models.tasks import get_task
from qtransformers.train.optimizer import OPTIMIZERS, SCHEDULES

COMPUTE_DTYPES = ("float32", "bfloat16")
SECTIONS = ("model", "data", "optim", "train", "mesh", "distributed")
OPTIONAL_SECTIONS = ("evals",)  # configs written before it have none: the train.* aliases


def _field_type(hint: Any) -> type:
    """int / float / str / bool from a dataclass type hint, unwrapping `X | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def model_section(preset: str, method: str = "vanilla") -> ml_collections.ConfigDict:
    """config.model: `preset`, `method` and every ModelConfig field as a typed placeholder
    (None = take the preset / method value; set it to override)."""
    section = ml_collections.ConfigDict()
    section.preset = preset
    section.method = method
    for name, hint in ModelConfig.flat_field_types().items():
        section[name] = config_dict.placeholder(_field_type(hint))
    return section


def default_data_section() -> ml_collections.ConfigDict:
    """config.data: the data layer's defaults."""
    return inputs.default_data_config()


def base_config(preset: str, method: str = "vanilla") -> ml_collections.ConfigDict:
    """Every section with its defaults for a model preset (see MODEL_PRESETS) and method.

    model: preset, method ('vanilla' | 'clipped' | 'gated': the paper's settings), and every
      ModelConfig field as a placeholder (None = the preset / method value).
    data: the data layer's fields (qtransformers.data.default_data_config).
    optim: name 'adamw'; lr; b1, b2, eps; weight_decay (not on biases / LayerNorm);
      decay_ln_scale (decay LayerNorm scales too: OPT recipe for clipped / gated); no_decay
      (extra fnmatch patterns on '/'-joined parameter paths); warmup_steps (linear from 0);
      schedule 'linear' | 'cosine' | 'constant' (decays to min_lr_ratio * lr at num_steps);
      clip_norm (global norm, 0 = off); grad_accum_steps (micro-batches per update).
    train: global_batch_size; num_steps (optimizer updates); seed (init + dropout); log_every;
      eval_every / outlier_eval_every (0 = never; also at the last step); eval_steps /
      outlier_eval_steps (eval batches, 0 = the whole split); eval_batch_size (0 = the global
      batch); checkpoint_every (0 = no checkpoints except on SIGTERM); keep_checkpoints;
      async_checkpoint; compute_dtype 'float32' | 'bfloat16' (params stay float32);
      mlm_max_predictions (masked LM: run the MLM head on at most this many masked positions per
      row instead of all T, as BERT's max_predictions_per_seq; 0 = every position).
    evals: named evaluators run every N steps, at the end, by `qtransformers evaluate` and by
      `reproduce` (qtransformers.evals.registry): evals.NAME = dict(type='fp' | 'outliers' |
      'block_outliers' | 'ptq' | 'sensitivity', every=N, num_batches=8, batch_size=0, ...).
      train.eval_every / eval_steps declare evals.eval (type fp) and train.outlier_eval_every /
      outlier_eval_steps evals.outliers (tracked sites + block view); a declared name replaces
      that alias.
    mesh: shape {'data', 'fsdp', 'tensor'} (one -1 = the remaining devices);
      logical_axis_rules (logical axis name -> mesh axes).
    distributed: coordinator_address 'host:port', num_processes, process_id (None =
      auto-detect on TPU pods / SLURM / Open MPI, else one process); initialization_timeout (s).
    """
    config = ml_collections.ConfigDict()
    config.model = model_section(preset, method)
    config.data = default_data_section()
    config.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
        decay_ln_scale=False, no_decay=(), warmup_steps=0, schedule="linear", min_lr_ratio=0.0,
        clip_norm=1.0, grad_accum_steps=1))
    config.train = ml_collections.ConfigDict(dict(
        global_batch_size=32, num_steps=1000, seed=0, log_every=50, eval_every=1000,
        eval_steps=20, eval_batch_size=0, outlier_eval_every=0, outlier_eval_steps=4,
        checkpoint_every=1000, keep_checkpoints=3, async_checkpoint=True,
        compute_dtype="float32", mlm_max_predictions=0))
    config.evals = ml_collections.ConfigDict()
    config.mesh = ml_collections.ConfigDict(dict(
        shape=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
        logical_axis_rules=DEFAULT_LOGICAL_AXIS_RULES))
    config.distributed = ml_collections.ConfigDict(dict(
        coordinator_address=config_dict.placeholder(str),
        num_processes=config_dict.placeholder(int), process_id=config_dict.placeholder(int),
        initialization_timeout=300))
    return config


def parse_config_arg(arg: str | None, bare: str = "method", **defaults: str) -> dict[str, str]:
    """Preset arguments: 'gated' or 'method=gated,size=small' -> {'method': 'gated', ...}.

    A bare word sets the key `bare`. Unknown keys raise ValueError listing `defaults`' keys.
    """
    values = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        key, value = (key.strip(), value.strip()) if sep else (bare, key.strip())
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}.")
        values[key] = value
    return values


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config path:arg` would load it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("qtransformers_config", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"config file {path!r} cannot be imported; give a .py file.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of config.model (preset + method + set fields) and train.compute_dtype;
    with model.alpha set, T of γ = −α / T is data.seq_len unless model.alpha_seq_len is set."""
    section = config.model
    overrides = {k: v for k, v in section.items() if k not in ("preset", "method")
                 and v is not None}
    dtype = config.train.compute_dtype
    if overrides.get("dtype", dtype) != dtype:
        raise ValueError(f"model.dtype={overrides['dtype']!r} disagrees with train.compute_dtype="
                         f"{dtype!r}; set only train.compute_dtype.")
    overrides["dtype"] = dtype
    family = MODEL_PRESETS.get(section.preset, {}).get("family", "bert")
    if section.method not in PAPER_METHODS.get(family, {}):
        raise ValueError(f"model.method={section.method!r} is unknown; choose one of "
                         f"{tuple(PAPER_METHODS.get(family, {}))}.")
    return get_model_config(section.preset, section.method,
                            trained_seq_len=config.data.seq_len, **overrides)


def _check_keys(section: Any, name: str, known: set[str]) -> None:
    unknown = sorted(set(section.keys()) - known)
    if unknown:
        raise ValueError(f"unknown config keys {[f'{name}.{k}' for k in unknown]}; known keys in "
                         f"{name}: {sorted(known)}.")


def _positive_int(value: Any, name: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")


def validate_config(config: ml_collections.ConfigDict, check_paths: bool = True) -> ModelConfig:
    """Checks the whole config (no JAX device work); returns the resolved ModelConfig.

    Raises ValueError naming the field, the bad value and the fix for: unknown sections or keys,
    model fields, optimizer / train / mesh values, a batch that grad_accum_steps does not divide,
    a data config the data layer rejects (missing path, ...), and model / data mismatches.
    check_paths=False skips the checks that local data / tokenizer files exist.
    """
    _check_keys(config, "config", set(SECTIONS + OPTIONAL_SECTIONS))
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ValueError(f"config lacks sections {missing}; build it with "
                         "qtransformers.train.config.base_config(preset, method).")
    for name, known in (("optim", _OPTIM_KEYS), ("train", _TRAIN_KEYS), ("mesh", {"shape",
                        "logical_axis_rules"}), ("distributed", _DIST_KEYS)):
        _check_keys(config[name], name, known)
    optim, train = config.optim, config.train
    if train.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"train.compute_dtype={train.compute_dtype!r} is unknown; choose one of "
                         f"{COMPUTE_DTYPES}.")
    model_cfg = model_config_from(config)  # unknown model keys / bad values raise here

    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim.name!r} is unknown; choose one of {OPTIMIZERS}.")
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim.schedule!r} is unknown; choose one of "
                         f"{SCHEDULES}.")
    if not optim.lr >= 0 or math.isnan(optim.lr):
        raise ValueError(f"optim.lr={optim.lr!r} must be >= 0.")
    for key in ("b1", "b2"):
        if not 0.0 <= optim[key] < 1.0:
            raise ValueError(f"optim.{key}={optim[key]!r} must lie in [0, 1).")
    if not optim.eps > 0 or optim.weight_decay < 0 or optim.clip_norm < 0:
        raise ValueError("optim.eps must be > 0, optim.weight_decay >= 0 and optim.clip_norm >= 0 "
                         f"(0 = no clipping); got {optim.eps}, {optim.weight_decay}, "
                         f"{optim.clip_norm}.")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={optim.min_lr_ratio!r} must lie in [0, 1].")
    _positive_int(optim.warmup_steps, "optim.warmup_steps", 0)
    _positive_int(optim.grad_accum_steps, "optim.grad_accum_steps")
    for key in ("global_batch_size", "num_steps", "log_every", "keep_checkpoints"):
        _positive_int(train[key], f"train.{key}")
    for key in ("eval_every", "eval_steps", "eval_batch_size", "outlier_eval_every",
                "outlier_eval_steps", "checkpoint_every", "mlm_max_predictions"):
        _positive_int(train[key], f"train.{key}", 0)
    if train.mlm_max_predictions and not get_task(model_cfg).selects_predictions:
        raise ValueError(f"train.mlm_max_predictions={train.mlm_max_predictions} applies to "
                         f"masked LM (bert) only; set it to 0 for model.family="
                         f"{model_cfg.family!r}.")
    if train.global_batch_size % optim.grad_accum_steps:
        raise ValueError(f"train.global_batch_size={train.global_batch_size} is not divisible by "
                         f"optim.grad_accum_steps={optim.grad_accum_steps}; pick a batch that is "
                         "a multiple of it.")
    shape = dict(config.mesh.shape)
    if set(shape) != set(MESH_AXES):
        raise ValueError(f"mesh.shape has axes {sorted(shape)}; it needs exactly {MESH_AXES}.")
    _validate_distributed(config.distributed)
    _validate_data(config, model_cfg, check_paths)
    build_evaluators(train_evals(config), get_task(model_cfg))  # bad evals raise here
    return model_cfg


def _validate_distributed(dist: ml_collections.ConfigDict) -> None:
    """An explicit multi-process setup needs an address and a process id in range."""
    _positive_int(dist.initialization_timeout, "distributed.initialization_timeout")
    if dist.num_processes is None or dist.num_processes == 1:
        return
    _positive_int(dist.num_processes, "distributed.num_processes")
    if not dist.coordinator_address:
        raise ValueError(f"distributed.num_processes={dist.num_processes} needs "
                         "distributed.coordinator_address='host:port' (process 0's address).")
    if dist.process_id is None or not 0 <= dist.process_id < dist.num_processes:
        raise ValueError(f"distributed.process_id={dist.process_id!r} must lie in "
                         f"[0, {dist.num_processes}) when distributed.num_processes="
                         f"{dist.num_processes}.")


_OPTIM_KEYS = {"name", "lr", "b1", "b2", "eps", "weight_decay", "decay_ln_scale", "no_decay",
               "warmup_steps", "schedule", "min_lr_ratio", "clip_norm", "grad_accum_steps"}
_TRAIN_KEYS = {"global_batch_size", "num_steps", "seed", "log_every", "eval_every", "eval_steps",
               "eval_batch_size", "outlier_eval_every", "outlier_eval_steps", "checkpoint_every",
               "keep_checkpoints", "async_checkpoint", "compute_dtype", "mlm_max_predictions"}
_DIST_KEYS = {"coordinator_address", "num_processes", "process_id", "initialization_timeout"}


def _validate_data(config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                   check_paths: bool) -> None:
    """Data-layer validation plus the model / data agreements."""
    data = config.data
    try:
        inputs.validate_data_config(data, check_paths)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err
    objective = get_task(model_cfg).data_objective
    if data.objective != objective:
        raise ValueError(f"data.objective={data.objective!r} cannot train a {model_cfg.family} "
                         f"model; set data.objective={objective!r}.")
    if objective == "image":
        if data.image_size != model_cfg.image_size:
            raise ValueError(f"data.image_size={data.image_size} differs from model.image_size="
                             f"{model_cfg.image_size}; set them equal.")
        return
    if data.seq_len > model_cfg.max_len:
        raise ValueError(f"data.seq_len={data.seq_len} exceeds model.max_len="
                         f"{model_cfg.max_len}; shorten data.seq_len or raise model.max_len.")
    if data.tokenizer in ("byte", "word"):  # files need loading; checked at start-up
        check_vocab(inputs.data_vocab_size(config), model_cfg)


def check_vocab(data_vocab: int, model_cfg: ModelConfig) -> None:
    """Raises ValueError when the tokenizer has more ids than the model's embedding rows."""
    if data_vocab > model_cfg.vocab_size:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                         f"tokenizer's {data_vocab} ids; set model.vocab_size >= {data_vocab} "
                         "(a multiple of 128 shards well).")


def validate_for_devices(config: ml_collections.ConfigDict, mesh_sizes: tuple[int, ...],
                         process_count: int) -> None:
    """Batch checks that need the resolved mesh (data, fsdp, tensor) and the process count."""
    train, accum = config.train, config.optim.grad_accum_steps
    dp = mesh_sizes[0] * mesh_sizes[1]
    if train.global_batch_size % (dp * accum):
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by the "
            f"data-parallel size {dp} (mesh data*fsdp = {mesh_sizes[0]}*{mesh_sizes[1]}) times "
            f"optim.grad_accum_steps={accum}; use a multiple of {dp * accum}.")
    if train.global_batch_size % process_count:
        raise ValueError(f"train.global_batch_size={train.global_batch_size} is not divisible by "
                         f"the {process_count} processes.")
    eval_batch = train.eval_batch_size or train.global_batch_size
    if eval_batch % dp or eval_batch % process_count:
        raise ValueError(f"train.eval_batch_size={eval_batch} is not divisible by the "
                         f"data-parallel size {dp} and the {process_count} processes.")
