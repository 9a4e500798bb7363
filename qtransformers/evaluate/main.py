"""`qtransformers evaluate`: FP metric, outlier metrics and W8A8 PTQ (mean ± std over seeds).

    qtransformers evaluate --checkpoint WORKDIR                 # a trainer workdir
    qtransformers evaluate --checkpoint HF_FOLDER --data builtin --seq_len 128
    qtransformers evaluate --checkpoint params.msgpack --model opt_6l --method gated
    qtransformers evaluate --model opt_tiny --data random        # random init (smoke test)

Checkpoint sources (--checkpoint):
- a trainer workdir (config.json with 'resolved_model' + checkpoints/): the newest orbax step;
  the data config of the run is the default --data ('workdir');
- a HuggingFace `save_pretrained` folder (config.json with 'model_type'): qtransformers.convert;
- a params file: '*.msgpack' (flax.serialization.to_bytes / msgpack_serialize of the params
  dict) or an orbax PyTreeCheckpointer folder; the architecture comes from --model / --method;
- none: --model / --method with random init.
Data (--data): 'random' (uniform tokens / Gaussian images), 'builtin' (qtransformers.data's
corpus with the byte tokenizer, or synthetic images), 'workdir' (the trainer run's data config).
Calibration batches per PTQ seed: random batches (random / builtin: the training iterator
seeded by the PTQ seed).

Prints a table (FP, max inf-norm, avg kurtosis, W8A8 mean ± std) and, with --out, writes JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from qtransformers import fileio
from qtransformers.evaluate.outliers import collect_outlier_metrics
from qtransformers.evaluate.report import format_table, per_layer_rows, ptq_row, write_json
from qtransformers.models import ModelConfig, build_model, get_model_config
from qtransformers.quant.calibrate import FAMILY_TASKS, flatten_points
from qtransformers.quant.config import PRESETS, get_preset
from qtransformers.quant.evaluate import evaluate_ptq
from qtransformers.quant.params import quantize_params
from qtransformers.quant.sensitivity import GROUPINGS, quantization_sensitivity, sensitivity_rows

DATA_CHOICES = ("random", "builtin", "workdir")
DEFAULT_PRESETS = {"bert": "w8a8_bert", "opt": "w8a8_opt", "vit": "w8a8_vit"}
DATA_OBJECTIVES = {"bert": "mlm", "opt": "clm", "vit": "image"}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `qtransformers evaluate`."""
    p = argparse.ArgumentParser(prog="qtransformers evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="", help="trainer workdir, HF folder or params file")
    p.add_argument("--model", default="", help="model preset (random init or params file)")
    p.add_argument("--method", default="vanilla", help="vanilla | clipped | gated")
    p.add_argument("--data", default="", choices=("",) + DATA_CHOICES,
                   help="eval data (default: workdir for a trainer workdir, else random)")
    p.add_argument("--preset", default="", help=f"quant preset, one of {tuple(PRESETS)} "
                   "(default: w8a8_<family>)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated PTQ seeds")
    p.add_argument("--num_eval_batches", type=int, default=8)
    p.add_argument("--num_calib_batches", type=int, default=0, help="0 = the preset's (16)")
    p.add_argument("--batch_size", type=int, default=8, help="eval batch size")
    p.add_argument("--calib_batch_size", type=int, default=0, help="0 = the preset's")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--no_quantized_outliers", action="store_true",
                   help="skip the outlier metrics of the quantized model")
    p.add_argument("--per_layer", action="store_true", help="also print the per-layer table")
    p.add_argument("--sensitivity", default="", choices=("",) + GROUPINGS,
                   help="also print the loss change of the weights alone, the activations "
                   "alone and each group of activation quantizers alone (PTQ seed 0's "
                   "calibration batches), grouped by QuantPoint kind, layer or point")
    p.add_argument("--out", default="", help="write the JSON report here")
    return p


def _fail(message: str) -> None:
    raise SystemExit(f"qtransformers evaluate: error: {message}")


def _read_json(path: str) -> dict[str, Any]:
    return json.loads(fileio.read_text(path))  # local or remote (gs://)


def restore_trainer_workdir(workdir: str) -> tuple[ModelConfig, Any, dict]:
    """(model config, params of the newest finalized checkpoint, run config) of a trainer workdir."""
    import orbax.checkpoint as ocp
    meta = _read_json(os.path.join(workdir, "config.json"))
    # PTQ and the outlier tools read the (B, H, T, T) attention tensors: evaluate on the
    # materialised path, numerically the same as the blocked / fused one a run trained with.
    model_cfg = ModelConfig.from_dict(meta["resolved_model"]).replace(
        attention_impl="materialized")
    ckpt_dir = os.path.join(fileio.absolute(workdir), "checkpoints")
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
    step = manager.latest_step()
    if step is None:
        _fail(f"no finalized checkpoint under {ckpt_dir}")
    # Restore onto this process's first device whatever mesh wrote the checkpoint (a checkpoint
    # from a multi-host run carries device ids that do not exist here).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = manager.item_metadata(step)["state"]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
        if hasattr(m, "shape") else m, metadata)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    state = restored["state"]
    params = state["params"] if isinstance(state, dict) else state.params
    return model_cfg, params, meta.get("config", {})


def _read_params_file(path: str) -> Any:
    if fileio.isdir(path):
        import orbax.checkpoint as ocp
        params = ocp.PyTreeCheckpointer().restore(fileio.absolute(path))
    else:
        from flax import serialization
        params = serialization.msgpack_restore(fileio.read_bytes(path))
    return params.get("params", params) if isinstance(params, dict) else params


def load_source(args: argparse.Namespace) -> tuple[ModelConfig, Any, dict]:
    """(model config, params, trainer run config or {}) for the --checkpoint / --model flags."""
    path = args.checkpoint
    problem = fileio.remote_support_problem(path)
    if problem:
        _fail(f"--checkpoint {problem}")
    config_json = os.path.join(path, "config.json") if path else ""
    if path and fileio.isfile(config_json):
        meta = _read_json(config_json)
        if "resolved_model" in meta:
            return restore_trainer_workdir(path)
        from qtransformers.convert import load_hf
        model_cfg, params = load_hf(path)
        return model_cfg, params, {}
    if not args.model:
        _fail("pass --model PRESET (with a params file or for random init) or --checkpoint "
              "pointing at a trainer workdir / HF folder")
    model_cfg = get_model_config(args.model, args.method)
    if path:
        if not fileio.exists(path):
            _fail(f"--checkpoint {path!r} does not exist")
        return model_cfg, _read_params_file(path), {}
    model = build_model(model_cfg)
    batch = random_batches(model_cfg, 1, 1, min(args.seq_len, model_cfg.max_len), seed=0)[0]
    args_ = (batch["image"],) if model_cfg.family == "vit" else (
        batch["input_ids"], batch["attention_mask"])
    return model_cfg, jax.jit(model.init)(jax.random.PRNGKey(0), *args_)["params"], {}


def random_batches(cfg: ModelConfig, num: int, batch_size: int, seq_len: int,
                   seed: int) -> list[dict[str, np.ndarray]]:
    """`num` random batches of the model's task (uniform tokens / Gaussian images)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        if cfg.family == "vit":
            s = cfg.image_size
            out.append({"image": rng.standard_normal((batch_size, s, s, cfg.num_channels),
                                                     np.float32),
                        "label": rng.integers(0, cfg.num_classes, batch_size, np.int32)})
            continue
        ids = rng.integers(0, cfg.vocab_size, (batch_size, seq_len), np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if cfg.family == "opt":
            batch["targets"] = np.roll(ids, -1, axis=1)
            weights = np.ones((batch_size, seq_len), np.float32)
            weights[:, -1] = 0.0
        else:
            batch["token_type_ids"] = np.zeros_like(ids)
            batch["targets"] = ids.copy()
            weights = (rng.random((batch_size, seq_len)) < 0.15).astype(np.float32)
        batch["weights"] = weights
        out.append(batch)
    return out


def _data_config(model_cfg: ModelConfig, run_config: dict, choice: str, seq_len: int) -> Any:
    try:
        import ml_collections
        from qtransformers import data as data_lib
    except ImportError as err:
        _fail(f"--data {choice} needs qtransformers.data ({err}); use --data random")
    if choice == "workdir":
        if "data" not in run_config:
            _fail("--data workdir needs a trainer workdir as --checkpoint")
        return ml_collections.ConfigDict(run_config["data"])
    cfg = data_lib.default_data_config()
    cfg.objective = DATA_OBJECTIVES[model_cfg.family]
    cfg.seq_len = seq_len
    if model_cfg.family == "vit":
        cfg.source = "synthetic"
        cfg.image_size = model_cfg.image_size
        cfg.num_classes = model_cfg.num_classes
    return cfg


def make_data(args: argparse.Namespace, model_cfg: ModelConfig, run_config: dict, config: Any,
              ) -> tuple[list[dict], Callable[[int], list[dict]]]:
    """(eval batches, seed -> calibration batches) for the --data choice."""
    choice = args.data or ("workdir" if run_config else "random")
    seq_len = min(args.seq_len, model_cfg.max_len)
    n_calib, calib_bs = config.num_calibration_batches, config.calibration_batch_size
    if choice == "random":
        evals = random_batches(model_cfg, args.num_eval_batches, args.batch_size, seq_len, 10**6)
        return evals, lambda seed: random_batches(model_cfg, n_calib, calib_bs, seq_len, seed)
    from qtransformers import data as data_lib
    data_cfg = _data_config(model_cfg, run_config, choice, seq_len)
    workdir = args.checkpoint if choice == "workdir" else None
    evals = list(itertools.islice(iter(data_lib.make_eval_iterator(
        data_cfg, batch_size=args.batch_size, workdir=workdir)), args.num_eval_batches))

    def calib(seed: int) -> list[dict]:
        it = data_lib.make_train_iterator(data_cfg, global_batch_size=calib_bs, seed=seed,
                                          workdir=workdir)
        return [next(it) for _ in range(n_calib)]

    return evals, calib


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the evaluation; argv are the arguments after `evaluate` (default sys.argv[1:])."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        _fail(f"--seeds must be comma-separated ints, got {args.seeds!r}")
    if not seeds:
        _fail("--seeds must name at least one seed")
    start = time.time()
    model_cfg, params, run_config = load_source(args)
    family = model_cfg.family
    try:
        config = get_preset(args.preset or DEFAULT_PRESETS[family])
    except ValueError as err:
        _fail(f"--preset: {err}")
    overrides = {}
    if args.num_calib_batches:
        overrides["num_calibration_batches"] = args.num_calib_batches
    if args.calib_batch_size:
        overrides["calibration_batch_size"] = args.calib_batch_size
    config = config.replace(seeds=seeds, **overrides)
    if args.sensitivity and config.act_granularity != "per_tensor":
        _fail(f"--sensitivity needs a preset with per-tensor activation ranges; "
              f"{args.preset!r} has act_granularity={config.act_granularity!r}")
    model = build_model(model_cfg)
    try:
        evals, calib_fn = make_data(args, model_cfg, run_config, config)
    except (ValueError, FileNotFoundError) as err:
        _fail(f"evaluation data: {err}")
    if not evals:
        _fail("the evaluation data gave zero batches")
    top = max((int(np.max(b["input_ids"])) for b in evals if "input_ids" in b), default=-1)
    if top >= model_cfg.vocab_size:
        _fail(f"the eval data has token id {top} but the model's vocab_size is "
              f"{model_cfg.vocab_size}; use a matching tokenizer / --data random")
    ptq = evaluate_ptq(model, params, evals, calib_fn, config, seeds)
    outliers = collect_outlier_metrics(model, params, evals, family)
    result = {"model": model_cfg.to_dict(), "checkpoint": args.checkpoint, "ptq": ptq,
              "outliers": outliers}
    if not args.no_quantized_outliers and ptq["qranges"]:
        first = ptq["qranges"][seeds[0]]
        result["outliers_quantized"] = collect_outlier_metrics(
            model, quantize_params(params, config), evals, family, qranges=first, config=config)
    ptq["qranges"] = {str(s): {p: [float(v["x_min"]), float(v["x_max"])]
                               for p, v in flatten_points(q).items()}
                      for s, q in ptq["qranges"].items()}
    name = args.checkpoint or f"{args.model} {args.method}"
    bits = f"W{config.weight_bits}A{config.act_bits}"
    print(format_table([ptq_row(name, ptq, outliers, bits)]))
    if args.per_layer:
        print()
        print(format_table(per_layer_rows(outliers)))
    if args.sensitivity:
        result["sensitivity"] = quantization_sensitivity(
            model, params, evals, calib_fn(seeds[0]), config, group_by=args.sensitivity)
        print()
        print(format_table(sensitivity_rows(result["sensitivity"])))
    print(f"({outliers['definition']}; task {FAMILY_TASKS[family]}, {len(evals)} eval batches, "
          f"PTQ seeds {list(seeds)}, {time.time() - start:.1f} s)")
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
