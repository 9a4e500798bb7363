"""OPT-350m causal LM (paper.md §6 OPT recipe): configs/opt_125m.py with lr 3e-4 (the OPT
paper's value for this size). Shape: 24L, 16H, d 1024, 512-wide projected embeddings, post-LN
(as released).

Usage: --config configs/opt_350m.py:method=gated   (vanilla | clipped | gated)
"""
import os

from qtransformers.train.config import load_config_file, parse_config_arg


def get_config(arg=None):
    """The experiment config for `arg` = 'vanilla' | 'clipped' | 'gated' (or method=...)."""
    method = parse_config_arg(arg, method="vanilla")["method"]
    config = load_config_file(os.path.join(os.path.dirname(__file__), "opt_125m.py"), method)
    config.model.preset = "opt_350m"
    config.optim.lr = 3e-4
    return config
