"""`qtransformers reproduce` presets: vanilla vs clipped softmax vs gated attention, one budget.

  qtransformers reproduce --config configs/reproduce.py:PRESET --workdir DIR [--config.x=y ...]

Presets:
  main       the default of `qtransformers reproduce` (estimated ~11 min + retrofits on 2 idle
             CPU cores, docs/results.md §10): Part 1, the
             real pretrained all-MiniLM-L6-v2 (outliers, W8A8 / A6 retrieval, retrofits when
             qtransformers.retrofit is installed), and Part 2, vanilla / clipped / gated
             trained from scratch on the Wikipedia summaries with a bit-width sweep (A8, A6,
             A5, A4, per-tensor and per-token). Needs the `real` extra.
  classic    the default before issue 18 (= 'cpu'): Part 2 only on the built-in corpus, W8A8
             only (~11 min on 2 CPU cores).
  wikitext   the same model on local text: trains on ../shared/data/wikitext-2/test.txt and
             evaluates on valid.txt (override --config.data.path / --config.data.eval_path).
  wikitext_h8  the cheapest setting we found where vanilla grows outliers (docs/results.md §6):
             wikitext with 8 heads of width 8, 2,000 steps, two training seeds (~50 min on 2
             CPU cores).
  wikitext_long  the same for 6,000 steps (~25 min per run on 2 CPU cores). On the 1.26 MB
             test.txt it overfits (held-out ppl 42.8 at 2,000 steps -> 52.0) and vanilla's
             outliers stop growing (docs/results.md §6.3): give it a larger corpus
             (--config.data.path=...; e.g. WikiText-103's wiki.train.tokens) on a GPU.
  gpu        the GPU budget (not run: no GPU was lent to us so far): wikitext_h8 scaled up to
             WikiText-103, 430× test.txt (6 layers, d 256, 16 heads of width 16,
             seq 64, batch 512, 40,000 steps = 1.3B tokens, bf16; vanilla / clipped / gated,
             or all six with methods=sweep; two seeds). Unzip WikiText-103 into ./wikitext-103
             or pass --config.data.path=.../wiki.train.tokens
             --config.data.eval_path=.../wiki.valid.tokens. `python3 launch/plan.py --config
             configs/reproduce.py:gpu --gpus 1 --mfu 0.1`: 12 min a run, 1.2 h for the six, on
             one H100 at 10% MFU (a 9M-parameter model will not reach more).
  bert_base, opt_125m, vit_s16
             the paper's full recipes (configs/bert_base.py etc.; paper.md §6) with the paper's
             per-model method settings (qtransformers.models.registry.PAPER_METHODS) and two
             training seeds as in paper Table 2. For TPU pods and GPU clusters: see
             docs/scaling.md for meshes and launchers.

Any preset takes methods=sweep (above) or methods=field: the paper's three against the field's
answers to heads that want to do nothing, softmax1, learned per-head sinks (gpt-oss) and
softpick, e.g. configs/reproduce.py:preset=wikitext_h8,methods=field.
"""
import os

import ml_collections

from qtransformers.models.registry import PAPER_METHODS
from qtransformers.reproduce import default_config
from qtransformers.train.config import load_config_file, parse_config_arg

HERE = os.path.dirname(os.path.abspath(__file__))
WIKITEXT = os.path.join("..", "shared", "data", "wikitext-2")
WIKITEXT103 = "wikitext-103"
PAPER_PRESETS = {"bert_base": "bert", "opt_125m": "opt", "vit_s16": "vit"}


def _paper_config(preset: str) -> ml_collections.ConfigDict:
    path = os.path.join(HERE, f"{preset}.py")
    config = load_config_file(path, "vanilla")
    family = PAPER_PRESETS[preset]
    methods = {}
    for method, fields in PAPER_METHODS[family].items():
        # The recipe may differ per method beyond the attention (OPT decays the LayerNorm scale
        # for clipped / gated only): carry each method's optimizer settings over.
        optim = load_config_file(path, method).optim.to_dict()
        changed = {k: v for k, v in optim.items() if v != config.optim[k]}
        methods[method] = dict(fields, **({"optim": changed} if changed else {}))
    config.reproduce = default_config.reproduce_section(
        methods=ml_collections.ConfigDict(methods), train_seeds=(0, 1),
        quant_preset=f"w8a8_{family}",
        num_eval_batches=200, eval_batch_size=64,
        num_calib_batches=16, calib_batch_size=32)
    return config


# methods=sweep: the issue-6 comparison, clipped softmax at α 4 and 12 and the paper's gate variants.
SWEEP_METHODS = {
    "vanilla": {},
    "clipped": {"softmax": "clipped", "alpha": 4.0, "alpha_seq_len": 64},
    "gated": {"gate": "linear", "gate_init": 0.25},
    "clipped_a12": {"softmax": "clipped", "alpha": 12.0, "alpha_seq_len": 64},
    "gated_pi05": {"gate": "linear", "gate_init": 0.5},
    "gated_mlp": {"gate": "mlp", "gate_init": 0.25},
}


# methods=field: the paper's methods against softmax1, learned sinks and softpick.
FIELD_METHODS = {
    "vanilla": {},
    "clipped": {"softmax": "clipped", "alpha": 4.0, "alpha_seq_len": 64},
    "gated": {"gate": "linear", "gate_init": 0.25},
    "softmax1": {"softmax": "softmax1"},
    "sink": {"softmax": "sink"},
    "softpick": {"softmax": "softpick"},
}


def get_config(arg=None):
    """The reproduce config for `arg` = a preset name above (or preset=NAME; default cpu),
    optionally with methods=sweep (vanilla, clipped α 4 / 12, linear gate π 0.25 / 0.5,
    MLP gate) for the local-text presets."""
    args = parse_config_arg(arg, bare="preset", preset="main", methods="paper")
    config = _preset_config(args["preset"])
    if args["methods"] in ("sweep", "field"):
        config.reproduce.methods = ml_collections.ConfigDict(
            SWEEP_METHODS if args["methods"] == "sweep" else FIELD_METHODS)
    elif args["methods"] != "paper":
        raise ValueError(f"methods={args['methods']!r} is unknown; choose paper, sweep or field.")
    config.reproduce.preset = args["preset"]
    if args["preset"] not in PAPER_PRESETS:  # the paper recipes carry the paper's own γ
        config.reproduce.methods = ml_collections.ConfigDict(
            _clip_at_seq_len(config.reproduce.methods.to_dict(), config.data.seq_len))
    return config


def _clip_at_seq_len(methods: dict, seq_len: int) -> dict:
    """`methods` with clipped softmax's γ = −α/T taken at T = seq_len (the trained length)."""
    return {name: dict(fields, **({"alpha_seq_len": seq_len} if "alpha" in fields else {}))
            for name, fields in methods.items()}


def _preset_config(preset: str) -> ml_collections.ConfigDict:
    if preset in PAPER_PRESETS:
        return _paper_config(preset)
    if preset == "gpu":
        return _gpu_config()
    if preset in ("main", "classic", "cpu"):
        return default_config.get_config(preset)
    if preset in ("wikitext", "wikitext_h8", "wikitext_long"):
        config = default_config.get_config("wikitext")
        config.data.path = os.path.join(WIKITEXT, "test.txt")
        config.data.eval_path = os.path.join(WIKITEXT, "valid.txt")
        if preset != "wikitext":
            # 8 heads of width 8: more heads that learn to do nothing, and outliers grow ~2x
            # faster than with 4 heads (docs/results.md §6).
            config.model.num_heads = 8
            config.train.update(num_steps=2000, checkpoint_every=500, outlier_eval_every=100)
            config.reproduce.train_seeds = (0, 1)
        if preset == "wikitext_long":
            config.train.update(num_steps=6000, outlier_eval_every=250)
        return config
    raise ValueError(f"reproduce preset {preset!r} is unknown; choose one of main, classic, "
                     "cpu, wikitext, "
                     f"wikitext_h8, wikitext_long, gpu, {', '.join(PAPER_PRESETS)}.")


def _gpu_config() -> ml_collections.ConfigDict:
    # wikitext_h8 scaled to a 430x larger corpus (13 epochs): 16 narrow heads (the CPU lever),
    # the same sequence length (at equal tokens per step, seq 256 grew no outliers on CPU: one
    # first token per 256 positions instead of 64; docs/results.md §6.1), a warmup then a
    # constant lr (3e-3 at d 256, 1e-2 at d 64), weight decay 0.1 kept (without it the whole
    # residual stream grows with the outliers, §6.4).
    config = default_config.get_config("wikitext")
    config.data.update(path=os.path.join(WIKITEXT103, "wiki.train.tokens"),
                       eval_path=os.path.join(WIKITEXT103, "wiki.valid.tokens"),
                       vocab_size=16384, seq_len=64)
    config.model.update(num_layers=6, d_model=256, num_heads=16, d_ff=1024, max_len=64,
                        vocab_size=16384)
    config.optim.update(lr=3e-3, warmup_steps=1000)
    config.train.update(global_batch_size=512, num_steps=40_000, compute_dtype="bfloat16",
                        log_every=200, eval_every=2000, eval_steps=20, checkpoint_every=2000,
                        keep_checkpoints=2, outlier_eval_every=500, outlier_eval_steps=4)
    config.reproduce.update(train_seeds=(0, 1), num_eval_batches=100, eval_batch_size=32)
    return config
