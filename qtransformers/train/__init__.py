"""Training: mesh + sharding rules, train state, train step, checkpoints, metric writers and
`train_and_evaluate(config, workdir)` (console: `qtransformers train --config ... --workdir ...`).

Heavy submodules (the loop, orbax) are imported on first use.
"""
from qtransformers.train.config import (base_config, load_config_file, model_config_from,
                                        parse_config_arg, validate_config)

__all__ = ["NonFiniteLossError", "Trainer", "base_config", "load_config_file",
           "model_config_from", "parse_config_arg", "train_and_evaluate", "validate_config"]


def __getattr__(name: str):
    if name in ("NonFiniteLossError", "Trainer", "train_and_evaluate"):
        from qtransformers.train import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'qtransformers.train' has no attribute {name!r}")
