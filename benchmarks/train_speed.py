"""Train-step speed on this machine: our JAX step vs HuggingFace PyTorch, and the methods.

Prints one table: for BERT (masked LM) and OPT (causal LM) of the same shape and batch, our
jitted train step (vanilla / clipped softmax / gated attention) and HuggingFace
BertForMaskedLM / OPTForCausalLM (vanilla, eager PyTorch) with the same optimizer (AdamW,
clip 1.0, dropout as the paper's recipes): compile time (JAX) or first step (PyTorch), median
step time, tokens/s, our tokens/s over HuggingFace's, step time over our vanilla step, and the
peak host memory of the run (resource.getrusage). Each measurement runs in its own process so
that peak memory and compile time are its own.

  python benchmarks/train_speed.py                 # --size small (6 layers, d 256), ~6 min
  python benchmarks/train_speed.py --size bert6l   # BERT-6L shapes (d 768); slow on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    "tiny": dict(num_layers=2, d_model=128, num_heads=4, d_ff=512, vocab_size=4096, batch=8,
                 seq_len=64),
    "small": dict(num_layers=6, d_model=256, num_heads=4, d_ff=1024, vocab_size=8192, batch=8,
                  seq_len=128),
    "bert6l": dict(num_layers=6, d_model=768, num_heads=12, d_ff=3072, vocab_size=30522,
                   batch=8, seq_len=128),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_step(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_jax(family: str, method: str, size: dict, steps: int, mlm_max_predictions: int = 0) -> dict:
    """Compile time and median step time of our sharded train step on one device."""
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    from qtransformers.models import build_model, get_model_config
    from qtransformers.train import mesh as mesh_lib
    from qtransformers.train.config import base_config
    from qtransformers.train.optimizer import make_optimizer
    from qtransformers.train.state import make_init_fn, state_shardings
    from qtransformers.train.step import make_train_step

    preset = "bert_base" if family == "bert" else "opt_125m"
    shape = {k: size[k] for k in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size")}
    cfg = get_model_config(preset, method, **shape)
    model = build_model(cfg)
    config = base_config(preset)
    config.optim.update(lr=1e-4, weight_decay=0.01, clip_norm=1.0, warmup_steps=0)
    tx, schedule = make_optimizer(config.optim, 1000)
    rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    batch_size, seq_len = size["batch"], size["seq_len"]
    _, shardings = state_shardings(model, cfg, tx, seq_len, mesh, rules)
    state = jax.jit(make_init_fn(model, cfg, tx, seq_len),
                    out_shardings=shardings)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, size["vocab_size"], (batch_size, seq_len + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "attention_mask": np.ones((batch_size, seq_len), np.int32)}
    if family == "bert":
        weights = (rng.random((batch_size, seq_len)) < 0.15).astype(np.float32)
        batch.update(targets=ids[:, :-1], weights=weights,
                     token_type_ids=np.zeros((batch_size, seq_len), np.int32))
    else:
        batch.update(targets=ids[:, 1:], weights=np.ones((batch_size, seq_len), np.float32))
    batch = mesh_lib.global_batch(batch, mesh, rules, batch_size)
    step_fn = jax.jit(make_train_step(model, family, tx, schedule, 1, mesh, rules,
                                      mlm_max_predictions), donate_argnums=(0,))
    with mesh_lib.sharding_context(mesh, rules):
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        holder = {"state": state}

        def one_step() -> None:
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)

        one_step()  # warm-up
        step_s = _median_step(one_step, steps)
    from qtransformers.planner import flops_per_token
    return {"compile_s": compile_s, "step_s": step_s, "peak_rss_mib": _peak_rss_mib(),
            "flops_per_step": flops_per_token(cfg, seq_len) * batch_size * seq_len}


def run_matmul_peak(steps: int) -> dict:
    """The machine's float32 matmul rate (2048^3 jitted matmul): the ceiling of any train step."""
    import jax
    import jax.numpy as jnp
    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ a)
    jax.block_until_ready(matmul(a))
    step_s = _median_step(lambda: jax.block_until_ready(matmul(a)), max(steps, 10))
    return {"flops_per_s": 2.0 * n ** 3 / step_s}


def run_torch(family: str, size: dict, steps: int) -> dict:
    """First-step and median step time of HuggingFace's model with torch.optim.AdamW."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    batch_size, seq_len, vocab = size["batch"], size["seq_len"], size["vocab_size"]
    if family == "bert":
        model = BertForMaskedLM(BertConfig(
            vocab_size=vocab, hidden_size=size["d_model"], num_hidden_layers=size["num_layers"],
            num_attention_heads=size["num_heads"], intermediate_size=size["d_ff"],
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12))
    else:
        model = OPTForCausalLM(OPTConfig(
            vocab_size=vocab, hidden_size=size["d_model"], num_hidden_layers=size["num_layers"],
            num_attention_heads=size["num_heads"], ffn_dim=size["d_ff"], dropout=0.1,
            attention_dropout=0.0, word_embed_proj_dim=size["d_model"],
            max_position_embeddings=2048, do_layer_norm_before=True))
    model.train()
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n
                or "layer_norm" in n]
    decay = [p for n, p in model.named_parameters() if not any(p is q for q in no_decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)
    ids = torch.randint(5, vocab, (batch_size, seq_len))
    mask = torch.ones_like(ids)
    if family == "bert":
        labels = torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, -100))
    else:
        labels = ids

    def one_step() -> None:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    one_step()
    first_s = time.perf_counter() - start
    step_s = _median_step(one_step, steps)
    return {"compile_s": first_s, "step_s": step_s, "peak_rss_mib": _peak_rss_mib(),
            "threads": torch.get_num_threads()}


def _measure(job: dict, steps: int, size: str) -> dict:
    """Runs one job in a fresh process (own peak memory, own compile cache)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as HuggingFace uses
    env.setdefault("JAX_PLATFORMS", "cpu")
    args = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job),
            "--steps", str(steps), "--size", size]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Runs every measurement and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--families", default="bert,opt")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds over the jobs; the table gives their median")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    if args.worker:
        job = json.loads(args.worker)
        if job["impl"] == "matmul":
            result = run_matmul_peak(args.steps)
        elif job["impl"] == "jax":
            result = run_jax(job["family"], job["method"], size, args.steps,
                             job.get("mlm_max_predictions", 0))
        else:
            result = run_torch(job["family"], size, args.steps)
        print(json.dumps(result))
        return

    tokens = size["batch"] * size["seq_len"]
    peak = _measure({"impl": "matmul"}, args.steps, args.size)["flops_per_s"]
    print(f"train step, size={args.size} {size}, {tokens} tokens/step, median of "
          f"{args.steps} steps x median of {args.rounds} alternating rounds, {os.cpu_count()} CPU cores, float32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    header = (f"{'model':6} {'implementation':16} {'method':8} {'compile/1st s':>13} "
              f"{'step ms':>9} {'tokens/s':>10} {'x HF':>6} {'x vanilla':>9} {'GFLOP/s':>8} "
              f"{'% peak':>6} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for family in args.families.split(","):
        jobs = [("HF PyTorch", "vanilla", {"impl": "torch", "family": family})]
        jobs += [("ours (JAX)", method, {"impl": "jax", "family": family, "method": method})
                 for method in ("vanilla", "clipped", "gated")]
        if family == "bert":  # the MLM head on the masked positions only (<= 25% of T)
            jobs.append(("ours, head@mask", "vanilla", {
                "impl": "jax", "family": family, "method": "vanilla",
                "mlm_max_predictions": size["seq_len"] // 4}))
        # Rounds alternate the jobs (A B C D A B C D ...) so that a slow spell of this noisy
        # machine hits every job alike; each number is the median over rounds.
        runs = [[_measure(job, args.steps, args.size) for _, _, job in jobs]
                for _ in range(args.rounds)]
        rows = []
        for index, (impl, method, _) in enumerate(jobs):
            per_round = [r[index] for r in runs]
            rows.append((impl, method, {key: statistics.median(r[key] for r in per_round)
                                        for key in per_round[0]}))
        hf = rows[0][2]
        vanilla_s = rows[1][2]["step_s"]
        hf["flops_per_step"] = rows[1][2]["flops_per_step"]  # same shapes, same model FLOPs
        for impl, method, r in rows:
            rate = tokens / r["step_s"]
            vs_hf = rate / (tokens / hf["step_s"])
            vs_vanilla = (f"{r['step_s'] / vanilla_s:9.2f}" if impl.startswith("ours")
                          else f"{'-':>9}")
            achieved = r["flops_per_step"] / r["step_s"]
            print(f"{family:6} {impl:16} {method:8} {r['compile_s']:13.2f} "
                  f"{1000 * r['step_s']:9.1f} {rate:10,.0f} {vs_hf:6.2f} "
                  f"{vs_vanilla} {achieved / 1e9:8.1f} {100 * achieved / peak:6.1f} "
                  f"{r['peak_rss_mib']:9.0f}")
    print("x HF: our tokens/s over HuggingFace's (same shape, batch, optimizer, dropout); "
          "x vanilla: step time over our vanilla step; compile/1st s: XLA compile (ours) or "
          "the first eager step (PyTorch); GFLOP/s: model FLOPs (6N + attention, "
          "qtransformers.planner) per second; % peak: of the float32 matmul rate above, the "
          "ceiling for both implementations; peak MiB: the process's max RSS.")


if __name__ == "__main__":
    main()
