"""`qtransformers evaluate --checkpoint ENCODER`: a sentence encoder's retrieval, FP vs quantized.

Called by evaluate.main for checkpoints that resolve to a sentence-transformers folder or a
head-less HF BertModel (evaluate.sources). Rows: full precision; the preset (default the task's,
paper W8A8 per-tensor static ranges) mean ± std over PTQ seeds; the same bits with per-token
dynamic activations. With --report DIR, the quantizability report (evaluate.quantizability).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from qtransformers.commandline import UserError
from qtransformers.evaluate.embedding import EmbeddingTask, config_label
from qtransformers.evaluate.report import format_table, write_json
from qtransformers.evaluate.sources import CheckpointSource

EMBED_BATCH_SIZE = 64


def run_embedding(args: Any, source: CheckpointSource, seeds: tuple[int, ...]) -> int:
    """Evaluates the encoder at `source`; returns the exit code."""
    from qtransformers.convert import EncoderTokenizer, load_encoder
    from qtransformers.data.wikipedia import WikipediaNotInstalledError
    from qtransformers.models import build_model
    from qtransformers.quant.config import get_preset

    start = time.time()
    try:
        model_cfg, params, info = load_encoder(source.path)
        tokenizer = EncoderTokenizer.from_folder(info, args.seq_len)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(f"--checkpoint {source.spec}: {str(err).splitlines()[0]}")
    try:
        task = EmbeddingTask.from_wikipedia(tokenizer, args.num_articles,
                                            batch_size=EMBED_BATCH_SIZE)
    except WikipediaNotInstalledError as err:
        raise UserError(f"the embedding task's text: {err}")
    try:
        config = get_preset(args.preset or task.default_preset)
    except ValueError as err:
        raise UserError(f"--preset: {err}")
    overrides: dict[str, Any] = {"seeds": seeds}
    if args.num_calib_batches:
        overrides["num_calibration_batches"] = args.num_calib_batches
    if args.calib_batch_size:
        overrides["calibration_batch_size"] = args.calib_batch_size
    config = config.replace(**overrides)
    if args.report and config.act_granularity != "per_tensor":
        raise UserError("--report needs a preset with per-tensor activation ranges.")
    print(f"{source.spec} -> {source.path} ({source.kind}, pooling {model_cfg.pooling}"
          f"{', normalized' if model_cfg.normalize_embeddings else ''}); {len(task.queries)} "
          f"articles, {task.num_tokens} tokens (max {tokenizer.max_length} per text)")
    model = build_model(model_cfg)
    fp = task.embed(model, params)
    rows = [{"config": "FP", **task.metrics(fp), "cos mean": 1.0, "cos p5": 1.0}]
    per_seed = []
    for seed in seeds:
        r = task.evaluate_config(model, params, config, fp=fp, seed=seed)
        per_seed.append({"seed": seed, **r["metrics"], "cos mean": r["cosine"]["mean"],
                         "cos p5": r["cosine"]["p5"]})
    mean = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0] if k != "seed"}
    std = float(np.std([s[task.headline_metric] for s in per_seed]))
    rows.append({"config": config_label(config) + f" ({len(seeds)} seeds)", **mean})
    token = task.evaluate_config(model, params, config.replace(act_granularity="per_token"),
                                 fp=fp)
    rows.append({"config": token["label"], **token["metrics"], "cos mean": token["cosine"]["mean"],
                 "cos p5": token["cosine"]["p5"]})
    print(format_table(rows, ["config", "recall@1", "recall@10", "mrr", "cos mean", "cos p5"]))
    print(f"({task.headline_metric} std over PTQ seeds {std:.4f}; cosine = FP vs quantized "
          f"embedding of every query and document; {time.time() - start:.1f} s)")
    result = {"checkpoint": args.checkpoint, "resolved": source.path, "kind": source.kind,
              "model": model_cfg.to_dict(), "task": task.name, "rows": rows,
              "per_seed": per_seed, "config": config.to_dict()}
    if args.out:  # before the (long) report
        write_json(args.out, {**result, "report": args.report or None})
        print(f"wrote {args.out}")
    if args.report:
        from qtransformers.evaluate.quantizability import quantizability_report, write_report
        known = {config_label(config): {k: v for k, v in per_seed[0].items() if k != "seed"},
                 token["label"]: rows[-1]}
        report = quantizability_report(task, model, params, config, fp, seed=seeds[0],
                                       known=known)
        for path in write_report(report, args.report, title=source.spec):
            print(f"wrote {path}")
    return 0
