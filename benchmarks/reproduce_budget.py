"""Part 2 budget search of `qtransformers reproduce` (docs/results.md §10.2): train methods on the
Wikipedia summaries in the wikitext_h8 setting, then run the bit sweep (quant.bit_sweep) on the
checkpoints of the steps in evals_at, with the paper's OPT ranges (w8a8_opt: 99.999 percentile)
and with MSE ranges (w6a6's estimator), weights 8-bit.

    python3 benchmarks/reproduce_budget.py NAME '{"evals_at": [400], "train.num_steps": 400}'

Writes runs to /tmp/reproduce_budget/NAME/METHOD and prints one line per (method, step, ranges).
A finished checkpoint at max(evals_at) is reused (no retraining).
"""
import json, os, sys, time, shutil
import logging; logging.basicConfig(level=logging.WARNING)
from configs.reproduce import get_config
from qtransformers.reproduce.runner import method_config
from qtransformers.train.loop import train_and_evaluate
from qtransformers.evaluate.checkpoints import restore_trainer_workdir
from qtransformers.models import build_model
from qtransformers import data as data_lib
from qtransformers.quant.config import get_preset
from qtransformers.quant.bit_sweep import bit_sweep

name = sys.argv[1]; spec = json.loads(sys.argv[2])
methods = spec.pop("methods", ["vanilla", "gated"])
evals_at = spec.pop("evals_at")
out = f"/tmp/reproduce_budget/{name}"
config = get_config("wikitext_h8")
config.data.update(source="wikipedia_summaries", path="", eval_path="")
for k, v in spec.items():
    sec, f = k.split(".")
    config[sec][f] = v
config.train.update(checkpoint_every=min(evals_at), keep_checkpoints=len(evals_at) + 1,
                    eval_every=max(evals_at), outlier_eval_every=max(evals_at) // 4)
config.reproduce.methods.clipped.alpha_seq_len = config.data.seq_len
results = {}
for method in methods:
    cfg = method_config(config, method, 0)
    cfg.train.num_steps = max(evals_at)
    run_dir = f"{out}/{method}"
    t0 = time.time()
    if not os.path.exists(run_dir + "/done") and not os.path.exists(f"{run_dir}/checkpoints/{max(evals_at)}"):
        train_and_evaluate(cfg, run_dir); open(run_dir + "/done", "w").write("1")
    train_s = time.time() - t0
    for step in evals_at:
        tmp = f"{out}/view_{method}_{step}"
        shutil.rmtree(tmp, ignore_errors=True); os.makedirs(tmp + "/checkpoints")
        shutil.copy(run_dir + "/config.json", tmp)
        os.symlink(f"{run_dir}/checkpoints/{step}", f"{tmp}/checkpoints/{step}")
        model_cfg, params, _ = restore_trainer_workdir(tmp)
        model = build_model(model_cfg)
        it = data_lib.make_eval_iterator(cfg.data, batch_size=32, workdir=run_dir)
        evals = [b for _, b in zip(range(16), it)]
        def calib(seed):
            it = data_lib.make_train_iterator(cfg.data, global_batch_size=8, seed=10_000 + seed, workdir=run_dir)
            return [next(it) for _ in range(16)]
        t1 = time.time()
        for preset in ("w8a8_opt", "w6a6"):
            base = get_preset(preset).replace(weight_bits=8, seeds=(0,), num_calibration_batches=16,
                                              calibration_batch_size=8)
            settings = [(8, "per_tensor"), (6, "per_tensor"), (5, "per_tensor"), (4, "per_tensor"), (6, "per_token"), (4, "per_token")]
            if preset == "w6a6": settings = [(6, "per_tensor"), (4, "per_tensor")]
            r = bit_sweep(model, params, evals, calib, base, settings)
            results[f"{method}@{step}/{preset}"] = r
            print(f"{name} {method} step {step} [{preset}] FP ppl {r['fp']['perplexity']:.2f} | " +
                  " | ".join(f"A{x['act_bits']}{'t' if x['granularity']=='per_token' else ''} {x['perplexity']:.2f} ({x['loss_change']:+.3f})" for x in r["rows"]), flush=True)
        print(f"  train {train_s:.0f}s sweep {time.time()-t1:.0f}s", flush=True)
    json.dump(results, open(f"{out}/results_{method}.json", "w"), default=float)
