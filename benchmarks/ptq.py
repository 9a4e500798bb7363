"""PTQ speed on this machine: FP vs W8A8 eval throughput, calibration and compile time.

    python3 benchmarks/ptq.py                 # BERT-6L and OPT-6L (d 768), seq 128, batch 8
    python3 benchmarks/ptq.py --size small    # tiny models, seconds

For each model: eval tokens/s of the jitted full-precision and W8A8 (fake-quantized weights and
activations, static per-tensor ranges) evaluation functions (median over --repeats timed calls
after a warm-up call), their ratio, seconds to calibrate --calib_batches batches (first call,
compile included, and a second call that reuses the compiled step) and compile seconds of each
jitted function (first call minus the median steady call). Random weights and tokens: speed
does not depend on them. Prints a Markdown table; numbers are never asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from qtransformers import build_model, get_model_config  # noqa: E402
from qtransformers.evaluate.report import format_table  # noqa: E402
from qtransformers.quant import (calibrate, get_preset, make_eval_fn,  # noqa: E402
                                 make_quantized_eval_fn, quantize_params)

SIZES = {
    "default": {"bert": ("bert_6l", {}), "opt": ("opt_6l", {})},
    "small": {"bert": ("bert_tiny", {}), "opt": ("opt_tiny", {})},
}
PRESETS = {"bert": "w8a8_bert", "opt": "w8a8_opt"}


def make_batch(cfg, batch_size: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """A random text batch of the model's task."""
    r = np.random.default_rng(seed)
    ids = r.integers(0, cfg.vocab_size, (batch_size, seq_len)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "targets": np.roll(ids, -1, 1), "weights": np.ones(ids.shape, np.float32)}
    if cfg.family == "bert":
        batch["token_type_ids"] = np.zeros_like(ids)
    return batch


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` later calls), outputs blocked on."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def bench(family: str, size: str, batch_size: int, seq_len: int, calib_batches: int,
          repeats: int) -> dict[str, object]:
    """One table row for `family` ('bert' | 'opt')."""
    preset, overrides = SIZES[size][family]
    cfg = get_model_config(preset, dropout_rate=0.0, attention_dropout_rate=0.0, **overrides)
    model = build_model(cfg)
    batch = make_batch(cfg, batch_size, seq_len, 0)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch["input_ids"],
                                               batch["attention_mask"])["params"])
    config = get_preset(PRESETS[family]).replace(num_calibration_batches=calib_batches,
                                                 calibration_batch_size=batch_size)
    calib = [make_batch(cfg, batch_size, seq_len, 1 + i) for i in range(calib_batches)]
    qparams = jax.block_until_ready(quantize_params(params, config))

    start = time.perf_counter()
    qranges = calibrate(model, qparams, calib, config)
    calib_first = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(model, qparams, calib, config)
    calib_steady = time.perf_counter() - start

    fp_first, fp_time = timed(make_eval_fn(model), params, batch, repeats=repeats)
    q_fn = make_quantized_eval_fn(model, None, config)
    q_first, q_time = timed(q_fn, qparams, qranges, batch, repeats=repeats)
    tokens = batch_size * seq_len
    return {
        "model": f"{preset} (L{cfg.num_layers} d{cfg.d_model})",
        "batch x seq": f"{batch_size}x{seq_len}",
        "FP tok/s": tokens / fp_time,
        "W8A8 tok/s": tokens / q_time,
        "W8A8 / FP": fp_time / q_time,
        f"calib {calib_batches} b (s)": calib_steady,
        "calib 1st (s)": calib_first,
        "compile FP (s)": fp_first - fp_time,
        "compile W8A8 (s)": q_first - q_time,
        "compile calib (s)": calib_first - calib_steady,
    }


def main(argv: list[str] | None = None) -> int:
    """Parses flags, runs the benchmark, prints the table."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default="default")
    p.add_argument("--models", default="bert,opt")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--calib_batches", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rows = []
    for family in args.models.split(","):
        if family not in PRESETS:
            p.error(f"--models entries must be among {tuple(PRESETS)}, got {family!r}")
        rows.append(bench(family, args.size, args.batch_size, args.seq_len,
                          args.calib_batches, args.repeats))
        print(format_table(rows[-1:]), flush=True)
    print()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs; medians of {args.repeats} calls")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
