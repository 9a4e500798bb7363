"""The default `qtransformers reproduce` experiment (preset 'main'), and the earlier default
('classic' = 'cpu').

'main' = Part 1 + Part 2, under 20 minutes on an idle 2-core CPU (estimated ~11 min + the
retrofits; docs/results.md §10):
- Part 1 (reproduce.part1, see reproduce/part1.py): the real pretrained all-MiniLM-L6-v2 (the
  `real` extra): its outliers (layer, site, channel, tokens) and what per-tensor W8A8 / A6 and
  per-token W8A8 do to its retrieval over 300 Wikipedia summaries; the retrofitted gated /
  clipped models beside it when qtransformers.retrofit is installed.
- Part 2: vanilla / clipped softmax / gated attention trained from scratch on the Wikipedia
  summaries (the `real` extra's text; 10% of the articles, chosen by title hash, held out): a
  word-level causal LM, 2,048-word vocabulary, [CLS] first and [SEP] at line breaks, pre-LN
  OPT-style, 4 layers, d 64, 8 heads of width 8 (the cheapest outlier-growing setting of
  docs/results.md §6), seq 64, batch 64, 400 steps, AdamW constant lr 1e-2, wd 0.1, no
  dropout; then the
  bit-width sweep (reproduce.bit_sweep: activation bits 8, 6, 5, 4 per-tensor and per-token,
  weights 8-bit).

'classic' (= 'cpu', the default before issue 18, ~11 min): Part 2 only, on the built-in corpus
(Python's help topics), 4 heads, 1,000 steps, W8A8 only.

Presets (`--config .../default_config.py:NAME`): 'main' (default), 'classic' / 'cpu', 'tiny'
(seconds; the test suite's end-to-end run), 'wikitext' (the classic model on a local text file:
pass --config.data.path=../shared/data/wikitext-2/valid.txt).
"""
import ml_collections

from qtransformers.reproduce.part1 import part1_section
from qtransformers.reproduce.sweep_stage import bit_sweep_section
from qtransformers.train.config import base_config, parse_config_arg

PRESETS = ("main", "classic", "cpu", "tiny", "wikitext")
# Part 2 of 'main': 400 steps per method (docs/results.md §10.2: at 400 steps on the Wikipedia
# summaries vanilla's A6 per-tensor loss change is 3.1x gated attention's; ~1.6 min a run on an
# idle 2-core CPU at the wikitext_h8 step time).
MAIN_STEPS = 400
MAIN_SWEEP = dict(act_bits=(8, 6, 5, 4), granularities=("per_tensor", "per_token"),
                  preset="w8a8_opt", ptq_seeds=(0,))

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
        num_calib_batches=16, calib_batch_size=32, preset="",
        bit_sweep=bit_sweep_section(), part1=part1_section(enabled=False)))
    for key, value in overrides.items():  # assigned, not merged: methods are replaced whole
        section[key] = value
    return section


def get_config(arg=None):
    """The reproduce config for `arg` = a name of PRESETS (or preset=NAME; default main)."""
    args = parse_config_arg(arg, bare="preset", preset="main")
    preset = args["preset"]
    if preset not in PRESETS:
        raise ValueError(f"reproduce preset {preset!r} is unknown; choose one of "
                         f"{', '.join(PRESETS)} (more recipes live in configs/reproduce.py).")
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
    config.reproduce = reproduce_section(preset=preset)
    if preset == "main":
        main_part2(config)
        config.reproduce.part1 = part1_section()
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


def main_part2(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Part 2 of 'main' on `config` (in place): Wikipedia summaries, 8 heads of width 8,
    MAIN_STEPS steps, the bit sweep."""
    config.data.update(source="wikipedia_summaries", path="", eval_path="")
    config.model.num_heads = 8
    config.train.update(num_steps=MAIN_STEPS, eval_every=MAIN_STEPS, checkpoint_every=200,
                        outlier_eval_every=50)
    config.reproduce.bit_sweep = bit_sweep_section(**MAIN_SWEEP)
    return config
