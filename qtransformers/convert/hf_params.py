"""HuggingFace BertForMaskedLM / OPTForCausalLM / ViTForImageClassification state dicts -> our
Flax params, with one strict check of every key and shape in both directions.

Layouts: a torch Linear weight (out, in) becomes a flax kernel (in, out); attention query / key /
value weights become (d_model, H, D) kernels with (H, D) biases and the output projection an
(H, D, d_model) kernel; ViT's Conv2d weight (O, I, kh, kw) becomes a flax HWIO kernel.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qtransformers.models.config import ModelConfig
from qtransformers.models.registry import build_model
from qtransformers.models.tasks import get_task

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF architecture names its weights.

    prefix: the base-model prefix HF adds in the task model ("bert.", "model.", "vit."); keys
      without it (saved from BertModel / OPTModel / ViTModel) get it added, except `heads`.
    renames: (regex, replacement) pairs mapping other accepted spellings onto our canonical
      (pre-transformers-5) key names.
    ignored: regexes of keys that are not weights of our model and are dropped on purpose.
    tied: key -> the key it duplicates; if present it must equal that key (our heads are tied).
    """

    prefix: str
    heads: tuple[str, ...]
    renames: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)


_VIT_LAYER = r"^vit\.(?:layers|encoder\.layer)\.(\d+)\."
# transformers >= 5 names ViT layers vit.layers.i.{attention.{q,k,v,o}_proj, mlp.fc1/2}.
_VIT_NEW_NAMES = (("attention.q_proj", "attention.attention.query"),
                  ("attention.k_proj", "attention.attention.key"),
                  ("attention.v_proj", "attention.attention.value"),
                  ("attention.o_proj", "attention.output.dense"),
                  ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
FAMILIES: dict[str, Family] = {
    "bert": Family(
        prefix="bert.", heads=("cls.",),
        renames=((r"\.LayerNorm\.gamma$", ".LayerNorm.weight"),  # TF-era BERT checkpoints
                 (r"\.LayerNorm\.beta$", ".LayerNorm.bias")),
        ignored=(r"(^|\.)position_ids$",  # index buffers saved by older transformers
                 r"^bert\.embeddings\.token_type_ids$",
                 r"^bert\.pooler\.",  # BertForPreTraining heads (e.g. bert-base-uncased),
                 r"^cls\.seq_relationship\."),  # which BertForMaskedLM does not have either
        tied={"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
              "cls.predictions.decoder.bias": "cls.predictions.bias"}),
    "opt": Family(prefix="model.", heads=("lm_head.",),
                  tied={"lm_head.weight": "model.decoder.embed_tokens.weight"}),
    "vit": Family(
        prefix="vit.", heads=("classifier.",),
        renames=tuple((_VIT_LAYER + re.escape(new) + r"\.", rf"vit.encoder.layer.\1.{old}.")
                      for new, old in _VIT_NEW_NAMES) + ((_VIT_LAYER, r"vit.encoder.layer.\1."),),
        ignored=(r"(^|\.)position_ids$", r"^vit\.pooler\."),  # ViTModel's pooler is unused
        ),
}

# kind -> (HF shape from our shape, HF array -> our array of `our_shape`).
_Kind = tuple[Callable[[Shape], Shape], Callable[[np.ndarray, Shape], np.ndarray]]
KINDS: dict[str, _Kind] = {
    "copy": (lambda s: s, lambda x, s: x),
    "linear": (lambda s: (s[1], s[0]), lambda x, s: x.T),
    "qkv_kernel": (lambda s: (s[1] * s[2], s[0]), lambda x, s: x.T.reshape(s)),
    "qkv_bias": (lambda s: (s[0] * s[1],), lambda x, s: x.reshape(s)),
    "out_kernel": (lambda s: (s[2], s[0] * s[1]), lambda x, s: x.T.reshape(s)),
    "conv": (lambda s: (s[3], s[2], s[0], s[1]), lambda x, s: x.transpose(2, 3, 1, 0)),
}

# Module kinds -> [(our leaf name, HF suffix, array kind)].
_MODULES: dict[str, list[tuple[str, str, str]]] = {
    "dense": [("kernel", "weight", "linear"), ("bias", "bias", "copy")],
    "dense_nobias": [("kernel", "weight", "linear")],
    "attn_in": [("kernel", "weight", "qkv_kernel"), ("bias", "bias", "qkv_bias")],
    "attn_out": [("kernel", "weight", "out_kernel"), ("bias", "bias", "copy")],
    "ln": [("scale", "weight", "copy"), ("bias", "bias", "copy")],
    "embed": [("embedding", "weight", "copy")],
    "conv": [("kernel", "weight", "conv"), ("bias", "bias", "copy")],
}

# Per-block modules: (our path inside layers_i, HF name inside layer i, module kind).
_BLOCKS: dict[str, list[tuple[str, str, str]]] = {
    "bert": [("attention/query", "attention.self.query", "attn_in"),
             ("attention/key", "attention.self.key", "attn_in"),
             ("attention/value", "attention.self.value", "attn_in"),
             ("attention/out", "attention.output.dense", "attn_out"),
             ("attention_ln/norm", "attention.output.LayerNorm", "ln"),
             ("mlp/intermediate", "intermediate.dense", "dense"),
             ("mlp/output", "output.dense", "dense"),
             ("mlp_ln/norm", "output.LayerNorm", "ln")],
    "opt": [("attention/query", "self_attn.q_proj", "attn_in"),
            ("attention/key", "self_attn.k_proj", "attn_in"),
            ("attention/value", "self_attn.v_proj", "attn_in"),
            ("attention/out", "self_attn.out_proj", "attn_out"),
            ("attention_ln/norm", "self_attn_layer_norm", "ln"),
            ("mlp/intermediate", "fc1", "dense"),
            ("mlp/output", "fc2", "dense"),
            ("mlp_ln/norm", "final_layer_norm", "ln")],
    "vit": [("attention/query", "attention.attention.query", "attn_in"),
            ("attention/key", "attention.attention.key", "attn_in"),
            ("attention/value", "attention.attention.value", "attn_in"),
            ("attention/out", "attention.output.dense", "attn_out"),
            ("attention_ln/norm", "layernorm_before", "ln"),
            ("mlp/intermediate", "intermediate.dense", "dense"),
            ("mlp/output", "output.dense", "dense"),
            ("mlp_ln/norm", "layernorm_after", "ln")],
}
_LAYERS = {"bert": ("encoder", "bert.encoder.layer"), "opt": ("decoder", "model.decoder.layers"),
           "vit": ("encoder", "vit.encoder.layer")}


def _modules(config: ModelConfig) -> list[tuple[str, str, str]]:
    """(our module path, HF module name, module kind) for every module that has weights."""
    fam = config.family
    if fam == "bert":
        top = [("word_embeddings", "bert.embeddings.word_embeddings", "embed"),
               ("position_embeddings", "bert.embeddings.position_embeddings", "embed"),
               ("token_type_embeddings", "bert.embeddings.token_type_embeddings", "embed"),
               ("embeddings_ln/norm", "bert.embeddings.LayerNorm", "ln")]
        if config.pooling is None:  # BertForMaskedLM; a sentence encoder has no head
            top += [("mlm_head/transform", "cls.predictions.transform.dense", "dense"),
                    ("mlm_head/transform_ln", "cls.predictions.transform.LayerNorm", "ln")]
    elif fam == "opt":
        top = [("embed_tokens", "model.decoder.embed_tokens", "embed"),
               ("embed_positions", "model.decoder.embed_positions", "embed")]
        if config.word_embed_proj_dim not in (None, config.d_model):
            top += [("project_in", "model.decoder.project_in", "dense_nobias"),
                    ("project_out", "model.decoder.project_out", "dense_nobias")]
        if config.final_ln:
            top.append(("final_ln/norm", "model.decoder.final_layer_norm", "ln"))
    else:
        top = [("patch_embeddings", "vit.embeddings.patch_embeddings.projection", "conv"),
               ("final_ln/norm", "vit.layernorm", "ln"),
               ("classifier", "classifier", "dense")]
    ours, theirs = _LAYERS[fam]
    for i in range(config.num_layers):
        top += [(f"{ours}/layers_{i}/{path}", f"{theirs}.{i}.{name}", kind)
                for path, name, kind in _BLOCKS[fam]]
    return top


def weight_map(config: ModelConfig) -> dict[str, tuple[str, str]]:
    """Our param path ("a/b/kernel") -> (canonical HF key, array kind) for a config."""
    out = {f"{path}/{leaf}": (f"{name}.{suffix}", kind)
           for path, name, module in _modules(config)
           for leaf, suffix, kind in _MODULES[module]}
    loose = {"bert": {} if config.pooling else {"mlm_head/bias": "cls.predictions.bias"},
             "opt": {},
             "vit": {"cls_token": "vit.embeddings.cls_token",
                     "position_embeddings": "vit.embeddings.position_embeddings"}}
    out.update({path: (key, "copy") for path, key in loose[config.family].items()})
    return out


def abstract_params(config: ModelConfig) -> dict[str, Any]:
    """Flat {"a/b/kernel": leaf} of `jax.eval_shape(model.init, ...)["params"]`; leaves are
    ShapeDtypeStructs, wrapped in nn.Partitioned where the model annotates axes."""
    model, task = build_model(config), get_task(config)
    args, _ = task.model_inputs(task.example_batch(config, 2))
    variables = jax.eval_shape(model.init, jax.random.key(0), *args)
    return traverse_util.flatten_dict(dict(variables["params"]), sep="/")


def canonical_key(key: str, family: str) -> str:
    """The canonical HF name of `key`: base-model prefix added, alternative spellings renamed."""
    fam = FAMILIES[family]
    if not key.startswith(fam.prefix) and not key.startswith(fam.heads):
        key = fam.prefix + key
    for pattern, replacement in fam.renames:
        key = re.sub(pattern, replacement, key)
    return key


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any float dtype, incl. bfloat16), numpy or jax array -> float32 numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _shape(leaf: Any) -> Shape:
    return tuple((leaf.value if isinstance(leaf, nn.Partitioned) else leaf).shape)


def _report(family: str, problems: dict[str, list[str]]) -> str:
    count = sum(len(items) for items in problems.values())
    lines = [f"the HF state dict does not match our {family} model ({count} problems):"]
    for title, items in problems.items():
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {item}" for item in items)
    return "\n".join(lines)


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: ModelConfig,
                              boxed: bool = False) -> dict[str, Any]:
    """Our Flax params for a HF state dict (torch tensors or arrays), checked strictly.

    Args:
      state_dict: a BertForMaskedLM / OPTForCausalLM / ViTForImageClassification state dict
        (`model.state_dict()`, a loaded model.safetensors / pytorch_model.bin); keys with or
        without the base-model prefix. Keys matching `FAMILIES[family].ignored` are dropped;
        tied duplicates (`FAMILIES[family].tied`) must equal the weight they duplicate.
      config: the ModelConfig to fill (usually `config_from_hf(hf_config)`).
      boxed: False gives plain float32 jax arrays (what `model.apply({"params": p}, ...)` needs);
        True wraps them in the same nn.Partitioned boxes as `model.init` (for sharding).
    Returns:
      The "params" tree, with exactly the paths and shapes of `model.init` for `config`.
    Raises:
      ValueError listing every missing, unexpected, duplicated or untied key, every shape
      mismatch (key, expected HF shape, got shape) and every model parameter with no HF source.
    """
    family = config.family
    fam = FAMILIES[family]
    if config.pooling is not None:  # a sentence encoder drops any task head on purpose
        fam = dataclasses.replace(fam, ignored=fam.ignored + tuple(
            "^" + re.escape(h) for h in fam.heads), tied={})
    abstract = abstract_params(config)
    wanted = weight_map(config)
    by_key = {key: path for path, (key, _) in wanted.items()}

    found: dict[str, str] = {}  # canonical key -> the key as given
    duplicated = []
    for key in state_dict:
        canon = canonical_key(key, family)
        if any(re.search(pattern, canon) for pattern in fam.ignored):
            continue
        if canon in found:
            duplicated.append(f"{key} (same weight as {found[canon]})")
        else:
            found[canon] = key

    problems: dict[str, list[str]] = {
        "missing keys": [], "unexpected keys": sorted(
            found[c] for c in found if c not in by_key and c not in fam.tied),
        "duplicated keys": duplicated, "shape mismatches": [], "untied weights": [],
        "model parameters with no HF weight": sorted(set(abstract) - set(wanted)),
        "HF weights with no model parameter (config does not match the model)": sorted(
            f"{path} <- {key}" for path, (key, _) in wanted.items() if path not in abstract)}
    hf_arrays: dict[str, np.ndarray] = {}
    for path, (key, kind) in wanted.items():
        if path not in abstract:
            continue
        expected = KINDS[kind][0](_shape(abstract[path]))
        if key not in found:
            problems["missing keys"].append(key)
            continue
        value = to_numpy(state_dict[found[key]])
        if value.shape != expected:
            problems["shape mismatches"].append(
                f"{found[key]}: expected {expected}, got {value.shape}")
            continue
        hf_arrays[key] = value
    for key, source in fam.tied.items():
        if key in found and source in hf_arrays:
            value = to_numpy(state_dict[found[key]])
            if value.shape != hf_arrays[source].shape or not np.array_equal(
                    value, hf_arrays[source]):
                problems["untied weights"].append(
                    f"{found[key]} differs from {found[source]} (our model ties them)")
    if any(problems.values()):
        raise ValueError(_report(family, problems))

    flat = {}
    for path, (key, kind) in wanted.items():
        leaf = abstract[path]
        value = jnp.asarray(KINDS[kind][1](hf_arrays[key], _shape(leaf)), dtype=jnp.float32)
        flat[path] = leaf.replace_boxed(value) if boxed and isinstance(
            leaf, nn.Partitioned) else value
    return traverse_util.unflatten_dict(flat, sep="/")
