"""OPT-1.3B causal LM (paper.md §6 OPT recipe): configs/opt_125m.py with lr 2e-4 (the OPT
paper's value for this size). FSDP over all devices and rematerialised blocks keep it in
accelerator memory.

Usage: --config configs/opt_1_3b.py:method=gated   (vanilla | clipped | gated)
"""
import os

from qtransformers.train.config import load_config_file, parse_config_arg


def get_config(arg=None):
    """The experiment config for `arg` = 'vanilla' | 'clipped' | 'gated' (or method=...)."""
    method = parse_config_arg(arg, method="vanilla")["method"]
    config = load_config_file(os.path.join(os.path.dirname(__file__), "opt_125m.py"), method)
    config.model.preset = "opt_1.3b"
    config.optim.lr = 2e-4
    config.model.remat = True
    config.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    return config
