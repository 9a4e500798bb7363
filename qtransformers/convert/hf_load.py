"""load_hf: a HF saved-model folder, a (state_dict, config) pair or a torch model -> our
(ModelConfig, params)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from qtransformers.convert.hf_config import config_from_hf, detect_family
from qtransformers.convert.hf_params import params_from_hf_state_dict
from qtransformers.models.config import ModelConfig

# Weight files in the order HF's from_pretrained prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _read_weight_file(path: Path) -> dict[str, Any]:
    """One safetensors / torch pickle file -> {key: tensor or array}."""
    if path.suffix == ".safetensors":
        try:
            import safetensors.torch as reader  # keeps bfloat16, which numpy cannot hold
        except ImportError:  # no torch (or no safetensors)
            try:
                import safetensors.numpy as reader
            except ImportError as err:
                raise ImportError(f"reading {path} needs the `safetensors` package.") from err
        return dict(reader.load_file(str(path)))
    import torch

    return dict(torch.load(str(path), map_location="cpu", weights_only=True))


def read_state_dict(folder: str | os.PathLike) -> dict[str, Any]:
    """The state dict saved in a HF model folder (single file or sharded with an index)."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _read_weight_file(path)
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lists shards that are not in {folder}: {missing}.")
        state_dict: dict[str, Any] = {}
        for shard in shards:
            state_dict.update(_read_weight_file(folder / shard))
        return state_dict
    raise FileNotFoundError(f"no weights in {folder}: expected one of {list(WEIGHT_FILES)}.")


def read_hf_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, config.json dict) of a `save_pretrained` folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"HF model folder {folder} does not exist (or is not a folder).")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a HF model folder needs config.json.")
    return read_state_dict(folder), json.loads(config_path.read_text())


def load_hf(source: Any, family: str | None = None, boxed: bool = False,
            **overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """Our (ModelConfig, params) for a HuggingFace BERT / OPT / ViT model.

    Args:
      source: one of
        - a folder written by `save_pretrained` (config.json + model.safetensors or
          pytorch_model.bin, possibly sharded with an *.index.json);
        - a (state_dict, hf_config) pair; hf_config is a PretrainedConfig, a config.json dict
          or already a ModelConfig (then `overrides` are applied to it);
        - a transformers model with a `.config` (BertForMaskedLM, OPTForCausalLM or OPTModel,
          ViTForImageClassification).
      family: "bert" | "opt" | "vit"; only needed when the config has no model_type.
      boxed: see `params_from_hf_state_dict`.
      overrides: ModelConfig fields to change, e.g. softmax="clipped" (the attention method
        must not add parameters: every parameter of our model needs a HF weight).
    Returns:
      (config, params) with `build_model(config).apply({"params": params}, ...)` ready to run.
    Raises:
      FileNotFoundError for a missing folder, config.json or weight file; ValueError for an
      unsupported config or a state dict that does not match (see params_from_hf_state_dict).
    """
    if isinstance(source, (str, os.PathLike)):
        state_dict, hf_config = read_hf_folder(source)
    elif isinstance(source, tuple) and len(source) == 2:
        state_dict, hf_config = source
    elif hasattr(source, "state_dict") and hasattr(source, "config"):
        state_dict, hf_config = source.state_dict(), source.config
    else:
        raise TypeError("load_hf expects a folder path, a (state_dict, hf_config) pair or a "
                        f"transformers model; got {type(source).__name__}.")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"the state dict must be a mapping, got {type(state_dict).__name__}.")
    if isinstance(hf_config, ModelConfig):
        if family not in (None, hf_config.family):
            raise ValueError(f"family={family!r} does not match config.family="
                             f"{hf_config.family!r}.")
        config = hf_config.replace(**overrides) if overrides else hf_config
    else:
        config = config_from_hf(hf_config, detect_family(hf_config, family), **overrides)
    return config, params_from_hf_state_dict(state_dict, config, boxed=boxed)
