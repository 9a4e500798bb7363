"""The default `qtransformers reproduce` experiment: about 11 minutes on a 2-core CPU (measured).

Setting (paper.md §8, the cheapest one measured there to grow outliers): a word-level causal
LM on the built-in corpus (Python's reference-manual help topics, shipped with every Python, so
nothing is downloaded) with a 2,048-word vocabulary, a [CLS] token first and [SEP] at every line
break (fixed first token + frequent delimiters = where no-op heads park their attention), a
pre-LN OPT-style model with 4 layers, d 64, 4 heads, sequence 64, batch 64, AdamW at a constant
lr 1e-2 with weight decay 0.1, and no dropout.

Presets (`--config .../default_config.py:NAME`): 'cpu' (default), 'tiny' (seconds; the
test suite's end-to-end run), 'wikitext' (the same model on a local text file: pass
--config.data.path=../shared/data/wikitext-2/valid.txt).
"""
import ml_collections

from qtransformers.train.config import base_config, parse_config_arg

# The methods compared, as ModelConfig field overrides on top of the vanilla model.
CPU_METHODS = {
    "vanilla": {},
    "clipped": {"softmax": "clipped", "alpha": 4.0, "alpha_seq_len": 64},  # γ = −4/64
    "gated": {"gate": "linear", "gate_init": 0.25},
}


def reproduce_section(**overrides) -> ml_collections.ConfigDict:
    """config.reproduce: which methods / seeds, and how to evaluate them."""
    section = ml_collections.ConfigDict(dict(
        methods=ml_collections.ConfigDict(CPU_METHODS), train_seeds=(0,), ptq_seeds=(0, 1, 2),
        quant_preset="w8a8_opt", num_eval_batches=16, eval_batch_size=32,
        num_calib_batches=16, calib_batch_size=32))
    for key, value in overrides.items():  # assigned, not merged: methods are replaced whole
        section[key] = value
    return section


def get_config(arg=None):
    """The reproduce config for `arg` = 'cpu' | 'tiny' | 'wikitext' (or preset=...; default cpu)."""
    args = parse_config_arg(arg, bare="preset", preset="cpu")
    preset = args["preset"]
    if preset not in ("cpu", "tiny", "wikitext"):
        raise ValueError(f"reproduce preset {preset!r} is unknown; choose cpu, tiny or wikitext "
                         "(paper-scale recipes live in configs/reproduce.py).")
    config = base_config("opt_tiny", "vanilla")
    config.model.update(num_layers=4, d_model=64, num_heads=4, d_ff=256, max_len=128,
                        vocab_size=2048, dropout_rate=0.0, attention_dropout_rate=0.0)
    config.data.update(source="text" if preset == "wikitext" else "builtin", tokenizer="word",
                       vocab_size=2048, objective="clm", seq_len=64, add_cls_first=True,
                       sep_at_line_breaks=True)
    config.optim.update(lr=1e-2, b1=0.9, b2=0.95, weight_decay=0.1, schedule="constant",
                        warmup_steps=0, clip_norm=1.0, decay_ln_scale=False)
    config.train.update(global_batch_size=64, num_steps=1000, log_every=100, eval_every=500,
                        eval_steps=8, eval_batch_size=32, outlier_eval_every=100,
                        outlier_eval_steps=2, checkpoint_every=250, keep_checkpoints=2)
    config.reproduce = reproduce_section()
    if preset == "tiny":
        config.model.update(num_layers=2, d_model=32, num_heads=2, d_ff=64, vocab_size=256)
        config.data.update(vocab_size=256, seq_len=16)
        config.reproduce.methods.clipped.alpha_seq_len = 16
        config.train.update(global_batch_size=8, num_steps=12, log_every=4, eval_every=12,
                            eval_steps=1, eval_batch_size=8, outlier_eval_every=6,
                            outlier_eval_steps=1, checkpoint_every=6)
        config.reproduce.update(ptq_seeds=(0, 1), num_eval_batches=2, eval_batch_size=8,
                                num_calib_batches=2, calib_batch_size=8)
    return config
