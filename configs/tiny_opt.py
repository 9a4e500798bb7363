"""A tiny OPT (2 layers, d 64) on the built-in corpus with the byte tokenizer: trains on a CPU
in about a minute. Usage: --config configs/tiny_opt.py:gated   (vanilla | clipped | gated)
"""
from qtransformers.train.config import base_config, parse_config_arg


def get_config(arg=None):
    """The experiment config for `arg` = 'vanilla' | 'clipped' | 'gated' (or method=...)."""
    args = parse_config_arg(arg, method="vanilla")
    config = base_config("opt_tiny", args["method"])
    config.data.source = "builtin"
    config.data.tokenizer = "byte"
    config.data.objective = "clm"
    config.data.seq_len = 64
    config.optim.update(lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.1,
                        decay_ln_scale=args["method"] != "vanilla", warmup_steps=20,
                        schedule="linear", clip_norm=1.0)
    config.train.update(global_batch_size=16, num_steps=300, log_every=20, eval_every=100,
                        eval_steps=4, eval_batch_size=16, outlier_eval_every=100,
                        outlier_eval_steps=2, checkpoint_every=100, keep_checkpoints=2)
    return config
