"""The bit-width sweep stage of `qtransformers reproduce` (Part 2): one trained run's metric
against activation bits (per-tensor and per-token, weights at the preset's bits), written to
RUN_DIR/bit_sweep.json with the fingerprint of its training and sweep settings (a rerun with the
same settings reads it back).

config.reproduce.bit_sweep: act_bits (e.g. (8, 6, 5, 4); empty = no sweep), granularities
('per_tensor', 'per_token'), preset (the QuantConfig preset the bits are replaced in), ptq_seeds
(calibration seeds of the per-tensor settings). Evaluation and calibration batches are those of
the run's W8A8 evaluation (reproduce.num_eval_batches x eval_batch_size, num_calib_batches x
calib_batch_size).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from qtransformers import fileio
from qtransformers.quant.bit_sweep import bit_sweep, check_settings
from qtransformers.quant.config import get_preset
from qtransformers.train import run_identity

SWEEP_FILE = "bit_sweep.json"


def bit_sweep_section(**overrides: Any) -> ml_collections.ConfigDict:
    """config.reproduce.bit_sweep (default: off, act_bits empty)."""
    section = ml_collections.ConfigDict(dict(
        act_bits=(), granularities=("per_tensor", "per_token"), preset="w8a8_opt",
        ptq_seeds=(0,)))
    section.update(overrides)
    return section


def sweep_settings(rcfg: ml_collections.ConfigDict) -> list[tuple[int, str]]:
    """[(act_bits, granularity)] of config.reproduce.bit_sweep ([] when off or absent)."""
    section = rcfg.get("bit_sweep")
    if section is None or not list(section.act_bits):
        return []
    return check_settings([(int(b), g) for g in section.granularities for b in section.act_bits])


def validate_bit_sweep(rcfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError for a bad reproduce.bit_sweep section (before any training)."""
    if rcfg.get("bit_sweep") is None:
        return
    try:
        sweep_settings(rcfg)
        get_preset(rcfg.bit_sweep.preset)
    except ValueError as err:
        raise ValueError(f"reproduce.bit_sweep: {err}") from None
    if sweep_settings(rcfg) and not list(rcfg.bit_sweep.ptq_seeds):
        raise ValueError("reproduce.bit_sweep.ptq_seeds needs at least one seed.")


def sweep_fingerprint(train_fingerprint: str, rcfg: ml_collections.ConfigDict) -> str:
    settings = {k: json.loads(json.dumps(rcfg[k], default=list)) for k in (
        "num_eval_batches", "eval_batch_size", "num_calib_batches", "calib_batch_size")}
    sweep = json.loads(json.dumps(rcfg.bit_sweep.to_dict(), default=list))
    return run_identity.fingerprint({"train": train_fingerprint, "sweep": sweep, **settings})


def sweep_run(cfg: ml_collections.ConfigDict, run_dir: str, rcfg: ml_collections.ConfigDict,
              train_fingerprint: str, log: Any = print) -> dict[str, Any] | None:
    """The bit sweep of one trained run (quant.bit_sweep), read back when already made with
    these settings; None when the config has no sweep."""
    settings = sweep_settings(rcfg)
    if not settings:
        return None
    path = os.path.join(run_dir, SWEEP_FILE)
    fingerprint = sweep_fingerprint(train_fingerprint, rcfg)
    if os.path.exists(path):
        saved = fileio.read_json(path)
        if saved.get("fingerprint") == fingerprint:
            return saved
    from qtransformers.evals.data import DataConfigEvalData
    from qtransformers.evaluate.checkpoints import restore_trainer_workdir
    from qtransformers.models import build_model
    from qtransformers.models.tasks import get_task
    start = time.time()
    model_cfg, params, _ = restore_trainer_workdir(run_dir)
    model = build_model(model_cfg)
    # the batches reproduce's evaluators read (eval split; calibration_seed(s) training rows)
    data = DataConfigEvalData(get_task(model_cfg), cfg.data, rcfg.eval_batch_size,
                              workdir=run_dir)
    evals = data.eval_batches(rcfg.num_eval_batches)

    def calibration(seed: int) -> list[dict[str, Any]]:
        return data.calibration_batches(seed, rcfg.num_calib_batches, rcfg.calib_batch_size)

    base = get_preset(rcfg.bit_sweep.preset).replace(
        num_calibration_batches=rcfg.num_calib_batches,
        calibration_batch_size=rcfg.calib_batch_size, seeds=tuple(rcfg.bit_sweep.ptq_seeds))
    result = bit_sweep(model, params, evals, calibration, base, settings)
    result.update(preset=rcfg.bit_sweep.preset, fingerprint=fingerprint,
                  seconds=time.time() - start)
    log(f"bit sweep: {len(settings)} settings in {result['seconds']:.0f} s")
    fileio.write_json(path, result)
    return result


def combine_sweeps(sweeps: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's sweep over training seeds: FP and every setting's loss averaged (the metric
    is exp of the mean loss for perplexity, the mean for accuracy), loss_change recomputed."""
    import math
    import numpy as np
    first = sweeps[0]
    metric = first["metric"]
    mean = lambda values: float(np.mean(values))  # noqa: E731
    fp_loss = mean([s["fp"]["loss"] for s in sweeps])

    def metric_of(key: str, losses: list[float], values: list[float]) -> float:
        return math.exp(min(mean(losses), 700.0)) if key == "perplexity" else mean(values)

    rows = []
    for i, row in enumerate(first["rows"]):
        losses = [s["rows"][i]["loss"] for s in sweeps]
        rows.append(dict(row, loss=mean(losses), loss_change=mean(losses) - fp_loss,
                         per_seed=[v for s in sweeps for v in s["rows"][i]["per_seed"]],
                         **{metric: metric_of(metric, losses,
                                              [s["rows"][i][metric] for s in sweeps])}))
    fp = {"loss": fp_loss, metric: metric_of(metric, [s["fp"]["loss"] for s in sweeps],
                                             [s["fp"][metric] for s in sweeps])}
    return dict(first, fp=fp, rows=rows, training_seeds=len(sweeps))
