"""qtransformers: pretrain transformers that quantize well, and measure how well they quantize.

Implements Bondarenko, Nagel, Blankevoort (NeurIPS 2023), "Quantizable Transformers: Removing
Outliers by Helping Attention Heads Do Nothing": clipped softmax and gated attention.

The names below load their subpackage on first use (PEP 562), so `import qtransformers.ops`
brings in the pure math alone, not the models, PTQ or evaluation.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("BertForMaskedLM", "ModelConfig", "OptForCausalLM",
                     "VitForImageClassification", "build_model", "get_model_config"),
                    "qtransformers.models"),
    **dict.fromkeys(("config_from_hf", "load_hf", "params_from_hf_state_dict"),
                    "qtransformers.convert"),
    **dict.fromkeys(("Attention", "AttentionGate", "AttentionSpec", "NnxAttention",
                     "QuantPoint"), "qtransformers.nn"),
    **dict.fromkeys(("attention_fn", "blocked_attention", "clipped_softmax", "gamma_from_alpha",
                     "sink_softmax", "softmax1", "softpick"), "qtransformers.ops"),
    **dict.fromkeys(("collect_outlier_metrics", "outlier_eval_fn"), "qtransformers.evaluate"),
    **dict.fromkeys(("QuantConfig", "calibrate", "evaluate_ptq", "get_preset", "make_eval_fn",
                     "make_quantized_eval_fn", "quantize_params"), "qtransformers.quant"),
    **dict.fromkeys(("Task", "get_task", "register_task"), "qtransformers.models.tasks"),
    **dict.fromkeys(("RestoredRun", "restore_run"), "qtransformers.train.checkpointing"),
}
_SUBPACKAGES = ("cli", "commandline", "convert", "data", "evals", "evaluate", "fileio", "models",
                "nn", "ops", "planner", "quant", "reproduce", "train")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBPACKAGES:  # `qt.convert.load_encoder(...)` without importing it first
        return importlib.import_module(f"qtransformers.{name}")
    raise AttributeError(f"module 'qtransformers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))
