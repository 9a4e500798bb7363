"""OPT-1.3B causal LM (paper.md §6 OPT recipe): 125k steps x 192, block 512, AdamW (0.9, 0.95),
lr 2e-4 (the OPT paper's value for this size), 2k warmup, linear decay, wd 0.1 (LayerNorm
scales decayed too for clipped softmax / gated attention), clip 1.0, dropout 0.1 hidden / 0.0
attention.
FSDP over all devices and rematerialised blocks keep it in accelerator memory.

Usage: --config configs/opt_1_3b.py:method=gated   (vanilla | clipped | gated)
Data: Wikipedia (TFDS wiki40b/en; the paper adds BookCorpus). For OPT's GPT-2 BPE vocabulary pass
--config.data.tokenizer=/path/to/opt/tokenizer.json.
"""
from qtransformers.train.config import base_config, parse_config_arg


def get_config(arg=None):
    """The experiment config for `arg` = 'vanilla' | 'clipped' | 'gated' (or method=...)."""
    args = parse_config_arg(arg, method="vanilla")
    config = base_config("opt_1.3b", args["method"])
    config.data.source = "tfds"
    config.data.tfds_name = "wiki40b/en"
    config.data.objective = "clm"
    config.data.seq_len = 512
    config.data.tokenizer = "word"
    config.data.vocab_size = 50272
    config.optim.update(lr=2e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                        decay_ln_scale=args["method"] != "vanilla", warmup_steps=2_000,
                        schedule="linear", clip_norm=1.0)
    config.train.update(global_batch_size=192, num_steps=125_000, log_every=100,
                        eval_every=5_000, eval_steps=50, outlier_eval_every=25_000,
                        checkpoint_every=5_000, compute_dtype="bfloat16")
    config.model.remat = True
    config.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    return config
