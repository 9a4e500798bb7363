"""Attention memory and time at long sequence lengths: materialised vs blocked, per variant.

For each length T and softmax variant, the jitted forward + backward of one attention call
(d/dQ, dK, dV and, for "sink", the sink logits, of Σ out · cotangent) on the materialised path
(`ops.attention_scores` → softmax → `ops.attention_context`, as `nn.Attention` with
attention_impl="materialized") and the blocked path (`ops.blocked_attention`):

- memory: XLA's memory analysis of the compiled function, temp + output bytes (the inputs are
  the same for both and left out): the peak the computation needs beyond its arguments;
- time: the median over --repeats calls, materialised and blocked calls alternating so that a
  noisy machine hits both alike.

A materialised case whose analysed memory exceeds --run-limit-gib is compiled (memory only)
but not run. Causal masks by default (the OPT / causal-LM case; the blocked path skips the key
blocks above the diagonal, which the materialised one cannot); --bidirectional for BERT/ViT.

  python benchmarks/attention.py                                   # T 512, 2k, 8k, 5 variants
  python benchmarks/attention.py --lengths 16384 --variants clipped
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qtransformers.ops import attention as attn_ops  # noqa: E402
from qtransformers.ops.blocked_attention import blocked_attention  # noqa: E402
from qtransformers.ops.softmax import SOFTMAX_VARIANTS, get_softmax_fn  # noqa: E402

VARIANT_KW = {"vanilla": {}, "clipped": dict(gamma=-12.0 / 512), "softmax1": {}, "sink": {},
              "softpick": {}}
MIB = 2.0 ** 20


def attention_fn(impl: str, softmax: str, causal: bool, block: int):
    """fn(q, k, v, sink) -> (B, T, H, D) on the chosen path."""
    kw = VARIANT_KW[softmax]

    def materialized(q, k, v, sink):
        mask = attn_ops.causal_mask(q.shape[1]) if causal else None
        scores = attn_ops.attention_scores(q, k)
        probs = get_softmax_fn(softmax, sink=sink[:, None, None], **kw)(scores, where=mask)
        return attn_ops.attention_context(probs, v)

    def blocked(q, k, v, sink):
        return blocked_attention(q, k, v, softmax=softmax, sink=sink, causal=causal,
                                 block_q=block, block_k=block, **kw)

    return materialized if impl == "materialized" else blocked


def compile_fwd_bwd(fn, args):
    """The compiled jit of (q, k, v, sink, cotangent) -> gradients of Σ fn(...) · cotangent."""
    def fwd_bwd(q, k, v, sink, cotangent):
        out, vjp = jax.vjp(fn, q, k, v, sink)
        return vjp(cotangent)

    return jax.jit(fwd_bwd).lower(*args).compile()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,2048,8192", help="comma-separated T")
    parser.add_argument("--variants", default=",".join(SOFTMAX_VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=256, help="blocked path's tile")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path (median)")
    parser.add_argument("--bidirectional", action="store_true", help="no causal mask")
    parser.add_argument("--run_limit_gib", type=float, default=10.0,
                        help="compile but do not run cases needing more memory than this")
    args = parser.parse_args(argv)
    try:
        lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths must be comma-separated ints, got {args.lengths!r}")
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(SOFTMAX_VARIANTS))
    if unknown:
        parser.error(f"--variants {unknown} unknown; choose from {SOFTMAX_VARIANTS}")
    causal = not args.bidirectional

    print(f"attention fwd+bwd, B={args.batch} H={args.heads} D={args.head_dim}, "
          f"{'causal' if causal else 'bidirectional'}, float32, block {args.block}, "
          f"median of {args.repeats} alternating calls, {jax.devices()[0].platform} "
          f"({os.cpu_count()} cores)")
    header = (f"{'T':>6} {'variant':9} {'mat MiB':>9} {'blk MiB':>9} {'mem x':>7} "
              f"{'mat s':>8} {'blk s':>8} {'time x':>7}")
    print(header)
    print("-" * len(header))
    for length in lengths:
        shape = (args.batch, length, args.heads, args.head_dim)
        keys = jax.random.split(jax.random.PRNGKey(length), 4)
        q, k, v, cotangent = (jax.random.normal(key, shape) for key in keys)
        call_args = (q, k, v, jnp.zeros((args.heads,)), cotangent)
        for softmax in variants:
            compiled, memory = {}, {}
            for impl in ("materialized", "blocked"):
                compiled[impl] = compile_fwd_bwd(attention_fn(impl, softmax, causal, args.block),
                                                 call_args)
                analysis = compiled[impl].memory_analysis()
                memory[impl] = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
            runnable = [impl for impl in compiled
                        if memory[impl] <= args.run_limit_gib * 2 ** 30]
            times = {impl: [] for impl in runnable}
            for impl in runnable:  # warm-up
                jax.block_until_ready(compiled[impl](*call_args))
            for _ in range(args.repeats):
                for impl in runnable:
                    start = time.perf_counter()
                    jax.block_until_ready(compiled[impl](*call_args))
                    times[impl].append(time.perf_counter() - start)
            med = {impl: statistics.median(t) for impl, t in times.items()}
            mat_s = f"{med['materialized']:8.3f}" if "materialized" in med else f"{'not run':>8}"
            ratio = (f"{med['blocked'] / med['materialized']:7.2f}"
                     if "materialized" in med and "blocked" in med else f"{'-':>7}")
            blk_s = f"{med['blocked']:8.3f}" if "blocked" in med else f"{'not run':>8}"
            print(f"{length:>6} {softmax:9} {memory['materialized'] / MIB:9.1f} "
                  f"{memory['blocked'] / MIB:9.1f} "
                  f"{memory['materialized'] / memory['blocked']:7.1f} {mat_s} {blk_s} {ratio}",
                  flush=True)
            del compiled
    print("mem x: materialised memory over blocked; time x: blocked time over materialised.")


if __name__ == "__main__":
    main()
