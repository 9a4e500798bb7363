"""`qtransformers reproduce`: train each method under one budget, evaluate, and report.

Workdir layout (every stage is skipped when its output exists and was made by the current
config, so a rerun resumes):
  runs/<method>-seed<k>/        the trainer's workdir (checkpoints/, metrics.jsonl, ...)
  runs/<method>-seed<k>/train_done.json, eval.json   each with the fingerprint it was made with
  superseded/<method>-seed<k>-<fingerprint>/   a run trained under an earlier config, moved here
  report.md, report.json, *.png

A run's training fingerprint is that of its trainer config (qtransformers.train.run_identity:
model, data, optimizer, num_steps, seeds, ...); its evaluation fingerprint adds the evaluation
settings (quant preset, PTQ seeds, batches). A rerun whose config changes a run's training
fingerprint (a new budget, say) moves that run aside and trains it again; one that changes only
the evaluation settings evaluates again. Unaffected runs are reused.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from qtransformers import data as data_lib
from qtransformers import fileio
from qtransformers.evals import (DataConfigEvalData, build_evaluators, evaluation_models,
                                 run_evaluators)
from qtransformers.models import ModelConfig
from qtransformers.models.tasks import get_task
from qtransformers.quant.config import get_preset
from qtransformers.reproduce import analysis, plots
from qtransformers.reproduce.part1 import run_part1, validate_part1
from qtransformers.reproduce.sweep_stage import (combine_sweeps, sweep_run,
                                                  validate_bit_sweep)
from qtransformers.reproduce.report import build_report, write_report
from qtransformers.train import run_identity
from qtransformers.train.checkpointing import restore_run

log = logging.getLogger("qtransformers.reproduce")
# Sections a method may override besides model fields (reproduce.methods.NAME.optim.x = ...).
CONFIG_SECTIONS = ("optim", "train", "data")



class Preempted(Exception):
    """A run stopped by SIGTERM after saving a checkpoint; rerunning the command continues."""


def validate_reproduce_config(config: ml_collections.ConfigDict) -> None:
    """Checks the `reproduce` section before any training starts."""
    if "reproduce" not in config:
        raise ValueError("the config has no 'reproduce' section; start from "
                         "qtransformers.reproduce.default_config.get_config().")
    rcfg = config.reproduce
    methods = dict(rcfg.methods)
    if not methods:
        raise ValueError("reproduce.methods is empty; name at least one method.")
    if "vanilla" not in methods:
        raise ValueError("reproduce.methods must include 'vanilla': the report compares every "
                         "method against it and checks that it developed outliers.")
    known = set(ModelConfig().to_dict()) | set(CONFIG_SECTIONS)
    for method, overrides in methods.items():
        unknown = sorted(set(dict(overrides)) - known)
        if unknown:
            raise ValueError(f"reproduce.methods.{method} has unknown model fields {unknown}.")
    if not list(rcfg.train_seeds) or not list(rcfg.ptq_seeds):
        raise ValueError("reproduce.train_seeds and reproduce.ptq_seeds need at least one seed.")
    get_preset(rcfg.quant_preset)
    validate_bit_sweep(rcfg)
    validate_part1(rcfg)


def method_config(config: ml_collections.ConfigDict, method: str,
                  seed: int) -> ml_collections.ConfigDict:
    """The trainer config of one (method, seed) run: the base model plus the method's fields."""
    cfg = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
    overrides = dict(cfg.reproduce.methods[method])
    del cfg["reproduce"]
    cfg.model.method = "vanilla"
    for key, value in overrides.items():
        if key in CONFIG_SECTIONS:  # e.g. optim: {decay_ln_scale: True}
            for field, field_value in dict(value).items():
                if field not in cfg[key]:
                    raise ValueError(f"reproduce.methods.{method}.{key}.{field} is not a field "
                                     f"of config.{key}.")
                cfg[key][field] = field_value
        else:
            cfg.model[key] = value
    cfg.train.seed = int(seed)
    return cfg


def _token_strings(tokenizer: Any, ids: np.ndarray) -> list[str]:
    return analysis.token_labels(tokenizer, ids)


# The whole-model outlier summaries of each periodic evaluation (per-layer values go under
# 'per_layer'): the paper's tracked sites (the same definition as the evaluation table), then
# the block-output view under its own names.
HISTORY_COLUMNS = ("avg_kurtosis", "max_inf_norm", "block_kurtosis", "block_max_inf_norm",
                   "first_token_max_abs", "rest_max_abs", "first_token_attention")


def training_history(run_dir: str) -> list[dict[str, Any]]:
    """The trainer's periodic outlier evaluations of one run, in step order."""
    from qtransformers.train.writers import read_metrics
    return [dict({k: row[k] for k in HISTORY_COLUMNS if k in row}, step=step,
                 per_layer={k: v for k, v in row.items() if "/" in k})
            for step, row in sorted(read_metrics(run_dir, split="outliers").items())]


def _declared_evals(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    declared = cfg.get("evals")
    return declared.to_dict() if declared else {}


def reproduce_evals(cfg: ml_collections.ConfigDict,
                    rcfg: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """The evaluators run on each trained run: the run config's declared `evals` (if any),
    then tracked-site outliers and PTQ over reproduce.ptq_seeds (the types `qtransformers
    evaluate` and the trainer run, qtransformers.evals)."""
    common = {"num_batches": rcfg.num_eval_batches, "batch_size": rcfg.eval_batch_size}
    evals = {name: dict(settings) for name, settings in _declared_evals(cfg).items()}
    evals["outliers"] = {"type": "outliers", **common}
    evals["ptq"] = {"type": "ptq", **common, "preset": rcfg.quant_preset,
                    "seeds": tuple(rcfg.ptq_seeds), "num_calib_batches": rcfg.num_calib_batches,
                    "calib_batch_size": rcfg.calib_batch_size}
    return evals


def evaluate_run(cfg: ml_collections.ConfigDict, run_dir: str,
                 rcfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """FP quality, outlier metrics, W8A8 over PTQ seeds and the figure data of one trained run
    (cfg: its trainer config; rcfg: the reproduce section)."""
    run = restore_run(run_dir)
    model_cfg, task = run.model_cfg, get_task(run.model_cfg)
    evaluators = build_evaluators(reproduce_evals(cfg, rcfg), task)
    models = evaluation_models(model_cfg)
    data = DataConfigEvalData(task, cfg.data, rcfg.eval_batch_size, workdir=run_dir)
    results = run_evaluators(evaluators, models, run.params, data)
    ptq, outliers = results.pop("ptq"), results.pop("outliers")
    model = models[True]
    first = data.eval_batches(rcfg.num_eval_batches)[0]
    token_mask = task.token_mask(first)
    token_mask = None if token_mask is None else np.asarray(token_mask)
    layers = analysis.capture_intermediates(model, run.params, task.model_inputs(first)[0])
    layer_view = analysis.per_layer_outliers(layers, token_mask)
    if token_mask is None:
        tokens = ["[CLS]"] + [f"p{i}" for i in range(model_cfg.num_patches)]
    else:
        tokenizer = data_lib.build_tokenizer(cfg.data, workdir=run_dir)
        length = int(token_mask[0].sum())
        tokens = _token_strings(tokenizer, np.asarray(first["input_ids"][0, :length]))
    metric = task.headline_metric
    quantized = ptq["quantized"]
    out = dict(
        fp={metric: ptq["fp"][metric], "loss": ptq["fp"]["loss"]},
        w8a8=dict(values=[r[metric] for r in quantized["per_seed"]],
                  losses=[r["loss"] for r in quantized["per_seed"]]),
        outliers=dict(max_inf_norm=outliers["max_inf_norm"],
                      avg_kurtosis=outliers["avg_kurtosis"], **layer_view),
        history=training_history(run_dir),
        attention=analysis.attention_heads(layers, tokens, token_mask),
        gates=analysis.gate_distribution(layers),
        channels=analysis.outlier_channels(layers, token_mask))
    if results:  # the config's declared evals
        out["evals"] = {name: evaluators[name].scalars(r) for name, r in results.items()}
    return out


def combine_seeds(per_seed: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """One method's result over training seeds: means of the scalars, W8A8 pooled over all
    (training seed x PTQ seed) evaluations; figure data from the first seed."""
    first = dict(per_seed[0])
    mean = lambda values: float(np.mean(values))  # noqa: E731
    w8a8 = [v for r in per_seed for v in r["w8a8"]["values"]]
    w8a8_loss = [v for r in per_seed for v in r["w8a8"]["losses"]]
    first["fp"] = {metric: mean([r["fp"][metric] for r in per_seed]),
                   "loss": mean([r["fp"]["loss"] for r in per_seed])}
    first["w8a8"] = dict(mean=mean(w8a8), std=float(np.std(w8a8)), values=w8a8,
                         loss_mean=mean(w8a8_loss),
                         loss_change=mean(w8a8_loss) - first["fp"]["loss"])
    first["outliers"] = dict(first["outliers"])
    for key in ("max_inf_norm", "avg_kurtosis", "median_abs", "first_token_max_abs",
                "elsewhere_max_abs"):
        first["outliers"][key] = mean([r["outliers"][key] for r in per_seed])
    first["seeds"] = len(per_seed)
    return first


# reproduce settings that change a run's evaluation (not its training).
EVAL_SETTINGS = ("quant_preset", "ptq_seeds", "num_eval_batches", "eval_batch_size",
                 "num_calib_batches", "calib_batch_size")


def training_fields(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The identity fields of one run's trainer config (run_identity.identity_fields)."""
    from qtransformers.train.config import model_config_from
    return run_identity.config_fields(cfg, model_config_from(cfg))


def evaluation_fingerprint(train_fingerprint: str, rcfg: ml_collections.ConfigDict,
                           evals: Mapping[str, Any] | None = None) -> str:
    """The fingerprint of a run's evaluation: its training plus the evaluation settings (and the
    declared `evals`, when there are any)."""
    settings = {k: json.loads(json.dumps(rcfg[k], default=list)) for k in EVAL_SETTINGS}
    if evals:
        settings["evals"] = json.loads(json.dumps(evals, default=list))
    return run_identity.fingerprint({"train": train_fingerprint, **settings})


def _supersede_stale_run(workdir: str, run_dir: str, fields: dict[str, Any], tag: str) -> None:
    """Moves run_dir to workdir/superseded/ when its config.json records another training
    config than `fields` (then it is trained again from scratch); nothing else is touched."""
    record = run_identity.read_run_record(run_dir) if os.path.isdir(run_dir) else None
    if record is None:
        return
    old = run_identity.recorded_fields(record)
    changed = run_identity.differences(old, fields)
    if not changed:
        return
    shown = ", ".join(f"{k} {old.get(k)!r} -> {fields.get(k)!r}" for k in changed[:6])
    destination = os.path.join(workdir, "superseded",
                               f"{os.path.basename(run_dir)}-{run_identity.fingerprint(old)}")
    if os.path.exists(destination):
        destination += f"-{int(time.time())}"
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    shutil.move(run_dir, destination)
    log.warning("%s: trained under another config (%s); moved it to %s and training it again.",
                tag, shown, destination)


def run_reproduce(config: ml_collections.ConfigDict, workdir: str, *,
                  train_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
                  command: str = "") -> dict[str, Any]:
    """Trains every method x seed, evaluates each, writes report.md / report.json / PNGs.

    Args:
      config: trainer config plus a `reproduce` section (see default_config.get_config).
      workdir: output folder; rerunning with the same folder resumes.
      train_fn: (config, run_dir) -> final metrics (default qtransformers.train's
        train_and_evaluate).
    Returns:
      the report dict (also written to workdir/report.json).
    """
    from qtransformers.train.config import validate_config
    validate_reproduce_config(config)
    if fileio.is_remote(workdir):
        raise ValueError(f"reproduce --workdir={workdir!r}: the report, plots and resume markers "
                         "are written with local file I/O; give a local (or gcsfuse-mounted) "
                         "folder. Single trainings (`qtransformers train`) accept gs:// workdirs.")
    rcfg = config.reproduce
    runs = [(m, s) for m in ordered_methods(rcfg.methods) for s in rcfg.train_seeds]
    for method, seed in runs:  # every run's config is validated before any training
        validate_config(method_config(config, method, seed))
    if train_fn is None:
        from qtransformers.train.loop import train_and_evaluate as train_fn
    os.makedirs(workdir, exist_ok=True)
    start, timings, per_method = time.time(), {}, {}
    part1 = run_part1(rcfg.part1, workdir, log.info) if rcfg.get("part1", {}).get("enabled") \
        else None
    for index, (method, seed) in enumerate(runs, 1):
        run_dir = os.path.join(workdir, "runs", f"{method}-seed{seed}")
        cfg = method_config(config, method, seed)
        done, evaluated = (os.path.join(run_dir, n) for n in ("train_done.json", "eval.json"))
        tag = f"[reproduce {index}/{len(runs)}] {method} seed {seed}"
        fields = training_fields(cfg)
        train_fp = run_identity.fingerprint(fields)
        eval_fp = evaluation_fingerprint(train_fp, rcfg, _declared_evals(cfg))
        _supersede_stale_run(workdir, run_dir, fields, tag)
        if os.path.exists(done):
            log.info("%s: trained already (fingerprint %s), skipping", tag, train_fp)
        else:
            log.info("%s: training %d steps", tag, cfg.train.num_steps)
            t0 = time.time()
            metrics = train_fn(cfg, run_dir)
            if metrics.get("preempted"):
                raise Preempted(f"{method} seed {seed} preempted at step {metrics.get('step')}, "
                                "rerun the same command to continue.")
            fileio.write_json(done, dict(metrics, wall_seconds=time.time() - t0, fingerprint=train_fp,
                                   num_steps=cfg.train.num_steps))
        result = fileio.read_json(evaluated) if os.path.exists(evaluated) else None
        if result is not None and result.get("fingerprint") != eval_fp:
            log.info("%s: its evaluation was made with other settings; evaluating again", tag)
            result = None
        if result is None:
            log.info("%s: evaluating (FP, outliers, %s over PTQ seeds %s)", tag,
                     rcfg.quant_preset, list(rcfg.ptq_seeds))
            t0 = time.time()
            result = evaluate_run(cfg, run_dir, rcfg)
            result["eval_seconds"] = time.time() - t0
            result["fingerprint"] = eval_fp
            fileio.write_json(evaluated, result)
        sweep = sweep_run(cfg, run_dir, rcfg, train_fp, lambda m: log.info("%s: %s", tag, m))
        if sweep is not None:
            result = dict(result, bit_sweep=sweep)
        trained = fileio.read_json(done)
        timings[f"{method}-seed{seed}"] = dict(
            steps=int(trained.get("step", cfg.train.num_steps)),
            train_s=round(trained.get("wall_seconds", 0.0), 1),
            eval_s=round(result.get("eval_seconds", 0.0), 1))
        per_method.setdefault(method, []).append(result)

    family = ModelConfig.from_dict(
        fileio.read_json(os.path.join(workdir, "runs", f"{runs[0][0]}-seed{runs[0][1]}",
                                "config.json"))["resolved_model"]).family
    metric = get_task(family).headline_metric
    results = {m: combine_seeds(r, metric) for m, r in per_method.items()}
    for method, per_seed in per_method.items():  # the bit sweep, averaged over training seeds
        if per_seed[0].get("bit_sweep"):
            results[method]["bit_sweep"] = combine_sweeps([r["bit_sweep"] for r in per_seed])
    figures = write_figures(workdir, results)
    if part1 is not None:
        from qtransformers.reproduce.plots_part1 import write_part1_figures
        figures = dict(write_part1_figures(workdir, part1["minilm"]), **figures)
    run_info = dict(command=command or "qtransformers reproduce", machine=_machine(),
                    wall_seconds_this_invocation=round(time.time() - start, 1), runs=timings,
                    config=config.to_dict())
    report = build_report(family, metric, results, run_info, figures, part1=part1,
                          preset=rcfg.get("preset"))
    md_path, _ = write_report(workdir, report)
    log.info("wrote %s", md_path)
    return report


def ordered_methods(methods: Mapping[str, Any]) -> list[str]:
    """Method names in the paper's table order (vanilla, clipped, gated), then the rest sorted;
    ConfigDict iterates its keys sorted, which would put vanilla last."""
    known = [m for m in ("vanilla", "clipped", "gated") if m in methods]
    return known + sorted(m for m in methods if m not in known)


def write_figures(workdir: str, results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """All PNGs of the report; returns {title: file name relative to workdir}."""
    figures = {"per-layer outliers": "per_layer_outliers.png",
               "outliers over training": "outliers_over_training.png",
               "outlier channels and positions": "outlier_channels.png"}
    plots.plot_per_layer(results, os.path.join(workdir, figures["per-layer outliers"]))
    plots.plot_training_curves(results, os.path.join(workdir, figures["outliers over training"]))
    plots.plot_outlier_channels(results,
                                os.path.join(workdir, figures["outlier channels and positions"]))
    if any(result.get("bit_sweep") for result in results.values()):
        figures["bit-width sweep"] = "bit_sweep.png"
        plots.plot_bit_sweep(results, os.path.join(workdir, figures["bit-width sweep"]))
    for method, result in results.items():
        name = f"attention_{method}.png"
        plots.plot_attention_maps(method, result["attention"], os.path.join(workdir, name))
        figures[f"attention maps ({method})"] = name
        if result.get("gates"):
            name = f"gates_{method}.png"
            plots.plot_gate_distribution(result["gates"], os.path.join(workdir, name))
            figures[f"gate values ({method})"] = name
    return figures


def _machine() -> str:
    devices = jax.devices()
    return (f"{platform.machine()} {os.cpu_count()} cores, {len(devices)} x "
            f"{devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
