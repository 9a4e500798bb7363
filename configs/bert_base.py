"""BERT-base masked LM (paper.md §6): 1M steps x 256, seq 128, AdamW (0.9, 0.999), lr 1e-4,
10k warmup, linear decay, wd 0.01 (not bias / LayerNorm), clip 1.0, dropout 0.1.

Usage: --config configs/bert_base.py:method=clipped   (vanilla | clipped | gated)
Data: Wikipedia (TFDS wiki40b/en; the paper adds BookCorpus). For the original WordPiece
vocabulary pass --config.data.tokenizer=/path/to/bert-base-uncased/tokenizer.json.
"""
from qtransformers.train.config import base_config, parse_config_arg


def get_config(arg=None):
    """The experiment config for `arg` = 'vanilla' | 'clipped' | 'gated' (or method=...)."""
    args = parse_config_arg(arg, method="vanilla")
    config = base_config("bert_base", args["method"])
    config.data.source = "tfds"
    config.data.tfds_name = "wiki40b/en"
    config.data.objective = "mlm"
    config.data.seq_len = 128
    config.data.mlm_probability = 0.15
    config.data.tokenizer = "word"
    config.data.vocab_size = 30522
    config.optim.update(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                        warmup_steps=10_000, schedule="linear", clip_norm=1.0)
    # The MLM head runs on at most 32 masked positions of the 128 (15%: 19.2 +- 4 per row),
    # like BERT's max_predictions_per_seq; it skips ~20% of the step's FLOPs.
    config.train.mlm_max_predictions = 32
    config.train.update(global_batch_size=256, num_steps=1_000_000, log_every=100,
                        eval_every=10_000, eval_steps=50, outlier_eval_every=50_000,
                        checkpoint_every=10_000, compute_dtype="bfloat16")
    return config
