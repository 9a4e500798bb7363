"""BERT-6L (6 layers, 12 heads, d 768): the paper's ablation model (paper.md §6) with the
BERT-base recipe (configs/bert_base.py). The paper's ablations train on WikiText-103: pass
--config.data.source=text --config.data.path=/path/to/wikitext-103 (one .txt file or a folder).

Usage: --config configs/bert_6l.py:method=gated   (vanilla | clipped | gated)
"""
import os

from qtransformers.train.config import load_config_file, parse_config_arg


def get_config(arg=None):
    """The experiment config for `arg` = 'vanilla' | 'clipped' | 'gated' (or method=...)."""
    method = parse_config_arg(arg, method="vanilla")["method"]
    config = load_config_file(os.path.join(os.path.dirname(__file__), "bert_base.py"), method)
    config.model.preset = "bert_6l"
    return config
