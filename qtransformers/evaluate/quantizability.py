"""How quantizable is a sentence encoder? Outliers, where they fire, and what each quantizer costs.

    report = quantizability_report(task, model, params, config, fp)   # dict
    write_report(report, "DIR")   # DIR/report.md, report.json, outliers_per_layer.png,
                                  # channel_token_heatmap.png, metric_vs_bits.png

Contents:
- per QuantPoint (layer, site): max|x| over the probe texts, the mean per-text inf-norm, the mean
  per-text (non-excess) kurtosis, the channel with the largest |x| and peak / median-channel
  (max|x| of the worst channel over the median of the channels' max|x|);
- the top outlier channels of the sites with the largest max|x|, and the tokens (strings, with
  their position: 0 is [CLS]) where each fires hardest;
- the task metric (retrieval recall@1 / @10 / MRR; cosine to the FP embeddings) in full precision,
  under the config (paper W8A8: per-tensor static ranges), with per-token dynamic activations,
  and over a sweep A8 / A6 / A4 x W8 / W4 (per-tensor, the config's estimators);
- sensitivity by kind: with full-precision weights, the activation ranges calibrated once (all
  points, config's act_bits), then one kind of QuantPoint quantized at a time (every layer's
  'mlp_residual', ...); plus weights only and activations only. Measured by the cosine to the FP
  embeddings on the probe texts.
The probe texts are the task's first `probe_batches` evaluation batches (shortest texts first);
the sensitivity uses half of them (each kind compiles its own quantized forward).
"""
from __future__ import annotations

import functools
import os
import re
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from qtransformers.evaluate.embedding import (EmbeddingTask, EncoderApply, config_label,
                                              cosine_agreement, embed_texts)
from qtransformers.evaluate.outliers import OutlierAccumulator, TrackedSites
from qtransformers.evaluate.report import format_table, write_json
from qtransformers.nn.quant_point import OUTLIERS, QuantContext, point_path, quant_context
from qtransformers.quant.calibrate import flatten_points, token_mask_of, unflatten_points
from qtransformers.quant.config import QuantConfig
from qtransformers.quant.params import quantize_params
from qtransformers.quant.sensitivity import group_of

ALL_SITES = TrackedSites(full=(r".",), inf_only=(), layer_outputs=r"layers_\d+/mlp_ln/output$",
                         table_inf_norm="all")
ATTENTION_KINDS = ("scores", "probs")
SWEEP = ((8, 8), (8, 6), (8, 4), (4, 8), (4, 6), (4, 4))  # (weight bits, activation bits)


@functools.partial(jax.jit, static_argnums=(0,))
def _outlier_step(apply_fn: EncoderApply, params: Any, batch: Mapping[str, Any]) -> Any:
    with quant_context(QuantContext(), token_mask_of(batch)):
        _, cols = apply_fn({"params": params}, batch, [OUTLIERS])
    return cols[OUTLIERS]


def site_table(task: EmbeddingTask, model: Any, params: Any, probe_batches: int
               ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Rows per QuantPoint (see module docstring) and each point's per-channel max|x|."""
    acc = OutlierAccumulator(ALL_SITES)
    apply_fn = EncoderApply(model)
    for _, batch in task.inputs()[:probe_batches]:
        points = flatten_points(jax.device_get(_outlier_step(apply_fn, params, batch)))
        for path, d in points.items():  # attention 'channels' are key positions: keep the max
            if path.rsplit("/", 1)[-1] in ATTENTION_KINDS:
                d["channel_max"] = np.max(d["channel_max"], keepdims=True)
        acc.add(unflatten_points(points))
    result = acc.result()
    rows = []
    for path, entry in result["per_tensor"].items():
        cmax = np.asarray(result["channel_max"][path])
        m = re.search(r"layers_(\d+)/(.*)$", path)
        top = int(np.argmax(cmax))
        rows.append({"layer": m.group(1) if m else "-", "site": m.group(2) if m else path,
                     "max |x|": float(cmax.max()), "mean inf-norm": entry["inf_norm"],
                     "kurtosis": entry["kurtosis"], "top channel": top,
                     "peak / median channel": float(cmax.max() / max(np.median(cmax), 1e-12)),
                     "path": path})
    return rows, {p: np.asarray(c) for p, c in result["channel_max"].items()}


def capture(model: Any, params: Any, batch: Mapping[str, Any], paths: Sequence[str]
            ) -> dict[str, np.ndarray]:
    """The full-precision activations (B, T, ...) at QuantPoint `paths` for one batch."""
    return jax.device_get(_capture(model, tuple(paths), params, batch))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _capture(model: Any, paths: tuple[str, ...], params: Any, batch: Mapping[str, Any]) -> Any:
    wanted = set(paths)
    _, cols = model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
        capture_intermediates=lambda mdl, _: point_path(mdl) in wanted, mutable=["intermediates"])
    flat = flatten_points(cols["intermediates"])
    return {p: flat[p]["__call__"][0] for p in paths}


def outlier_tokens(task: EmbeddingTask, model: Any, params: Any, rows: list[dict[str, Any]],
                   channel_max: Mapping[str, np.ndarray], probe_batches: int, top_sites: int = 4,
                   top_channels: int = 3, top_tokens: int = 5) -> list[dict[str, Any]]:
    """For the token sites with the largest max|x|: their top channels and where they fire."""
    token_rows = [r for r in rows if r["site"].rsplit("/", 1)[-1] not in ATTENTION_KINDS]
    sites = [r["path"] for r in sorted(token_rows, key=lambda r: -r["max |x|"])[:top_sites]]
    hits: dict[tuple[str, int], list[tuple[float, str, int]]] = {}
    cls_share: dict[tuple[str, int], list[int]] = {}
    channels = {p: [int(c) for c in np.argsort(-channel_max[p])[:top_channels]] for p in sites}
    for _, batch in task.inputs()[:probe_batches]:
        acts = capture(model, params, batch, sites)
        mask = batch["attention_mask"].astype(bool)
        for p in sites:
            for c in channels[p]:
                v = np.where(mask, np.abs(acts[p][..., c]), -1.0)
                flat = np.argsort(-v, axis=None)[:top_tokens]
                for b, t in zip(*np.unravel_index(flat, v.shape)):
                    tok = task.tokenizer.id_to_token(batch["input_ids"][b, t])
                    hits.setdefault((p, c), []).append((float(acts[p][b, t, c]), tok, int(t)))
                # Which position holds each text's largest |x| in this channel.
                cls_share.setdefault((p, c), []).extend(
                    int(a) for a, m in zip(np.argmax(v, axis=1), mask.any(axis=1)) if m)
    out = []
    for (p, c), values in hits.items():
        best = sorted(values, key=lambda h: -abs(h[0]))[:top_tokens]
        out.append({"path": p, "channel": c, "max |x|": float(channel_max[p][c]),
                    "median channel max": float(np.median(channel_max[p])),
                    "share of texts peaking at position 0": float(np.mean(
                        np.asarray(cls_share[(p, c)]) == 0)),
                    "top tokens": [f"{tok}@{t} ({v:+.1f})" for v, tok, t in best]})
    return out


def _probe_cosine(task: EmbeddingTask, model: Any, params: Any, qranges: Any,
                  config: QuantConfig | None, fp_probe: np.ndarray, probe: list) -> dict:
    n = fp_probe.shape[0]
    emb = embed_texts(model, params, probe, n, qranges, config)
    return cosine_agreement(fp_probe, emb)


def sensitivity_by_kind(task: EmbeddingTask, model: Any, params: Any, config: QuantConfig,
                        probe_batches: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows (quantized part, points, cosine mean / p5 to FP) on the probe texts."""
    probe_pairs = task.inputs()[:probe_batches]
    idx = np.concatenate([i[i >= 0] for i, _ in probe_pairs])
    remap = {int(old): new for new, old in enumerate(idx)}
    probe = [(np.asarray([remap.get(int(i), -1) for i in ids]), b) for ids, b in probe_pairs]
    fp = embed_texts(model, params, probe, len(idx))
    ranges = flatten_points(task.calibrate(model, params, config, seed))  # FP weights
    rows = [{"quantized": "weights only", "points": 0, **_probe_cosine(
                task, model, quantize_params(params, config), {}, config, fp, probe)},
            {"quantized": "activations only", "points": len(ranges), **_probe_cosine(
                task, model, params, unflatten_points(ranges), config, fp, probe)}]
    kinds: dict[str, list[str]] = {}
    for p in ranges:
        kind = group_of(p, "kind")
        if kind == "output":  # LayerNorm outputs: name the LayerNorm (attention_ln/output)
            kind = "/".join(p.split("/")[-2:]) if "layers_" in p else p
        kinds.setdefault(kind, []).append(p)
    for kind, paths in kinds.items():
        subset = unflatten_points({p: ranges[p] for p in paths})
        rows.append({"quantized": f"kind {kind}", "points": len(paths),
                     **_probe_cosine(task, model, params, subset, config, fp, probe)})
    return rows


def quantizability_report(task: EmbeddingTask, model: Any, params: Any, config: QuantConfig,
                          fp: Mapping[str, np.ndarray] | None = None, *, probe_batches: int = 4,
                          sweep: Sequence[tuple[int, int]] = SWEEP, seed: int = 0,
                          known: Mapping[str, Mapping[str, Any]] | None = None,
                          log: Any = print) -> dict[str, Any]:
    """The report dict (see module docstring); `log` gets one line per finished stage.

    known: metric rows already measured (same task, params and seed), keyed by config_label,
    each {'recall@1', ..., 'cos mean', 'cos p5'}; those configs are not evaluated again.
    """
    known = known or {}
    start = time.time()
    fp = fp if fp is not None else task.embed(model, params)
    rows, channel_max = site_table(task, model, params, probe_batches)
    tokens = outlier_tokens(task, model, params, rows, channel_max, probe_batches)
    log(f"outliers: {len(rows)} sites ({time.time() - start:.0f} s)")
    worst = max((r for r in rows if r["site"].rsplit("/", 1)[-1] not in ATTENTION_KINDS),
                key=lambda r: r["max |x|"])
    heat_batch = task.inputs()[0][1]
    heat = capture(model, params, heat_batch, [worst["path"]])[worst["path"]]
    metrics = [{"config": "FP", **task.metrics(fp), "cos mean": 1.0, "cos p5": 1.0}]
    configs = [config, config.replace(act_granularity="per_token")]
    configs += [config.replace(weight_bits=w, act_bits=a) for w, a in sweep
                if (w, a) != (config.weight_bits, config.act_bits)]
    for c in configs:
        label = config_label(c)
        if label in known:
            row = dict(known[label])
        else:
            r = task.evaluate_config(model, params, c, fp=fp, seed=seed)
            row = {**r["metrics"], "cos mean": r["cosine"]["mean"], "cos p5": r["cosine"]["p5"]}
        metrics.append({"config": label, **row, "weight_bits": c.weight_bits,
                        "act_bits": c.act_bits})
        log(f"{label}: recall@1 {row['recall@1']:.4f}, cosine {row['cos mean']:.4f} "
            f"({time.time() - start:.0f} s)")
    # One compilation per kind (each subset of ranges is a new pytree): half the probe texts.
    sens_batches = max(1, probe_batches // 2)
    sensitivity = sensitivity_by_kind(task, model, params, config, sens_batches, seed)
    log(f"sensitivity: {len(sensitivity)} rows ({time.time() - start:.0f} s)")
    top = np.argsort(-channel_max[worst["path"]])[:16]
    mask = heat_batch["attention_mask"][-1].astype(bool)  # the longest text of the batch
    return {
        "config": config.to_dict(), "num_articles": len(task.queries),
        "probe_texts": int(sum(int((i >= 0).sum()) for i, _ in task.inputs()[:probe_batches])),
        "sensitivity_texts": int(sum(int((i >= 0).sum())
                                     for i, _ in task.inputs()[:sens_batches])),
        "sites": rows, "outlier_tokens": tokens, "metrics": metrics, "sensitivity": sensitivity,
        "heatmap": {"path": worst["path"], "channels": [int(c) for c in top],
                    "tokens": [task.tokenizer.id_to_token(i)
                               for i in heat_batch["input_ids"][-1][mask]],
                    "values": np.abs(heat[-1][mask][:, top]).T.tolist()},
        "seconds": time.time() - start}


def _plots(report: Mapping[str, Any], folder: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    kinds: dict[str, dict[int, float]] = {}
    for r in report["sites"]:
        if r["layer"] != "-":
            kinds.setdefault(r["site"], {})[int(r["layer"])] = r["max |x|"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind in sorted(kinds, key=lambda k: -max(kinds[k].values()))[:8]:
        layers = sorted(kinds[kind])
        ax.plot(layers, [kinds[kind][i] for i in layers], marker="o", label=kind)
    ax.set(yscale="log", xlabel="layer", ylabel="max |x| over probe texts",
           title="Per-layer outliers (8 sites with the largest max |x|)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(os.path.join(folder, "outliers_per_layer.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    heat = report["heatmap"]
    values = np.asarray(heat["values"])
    fig, ax = plt.subplots(figsize=(min(18, 2 + 0.25 * values.shape[1]), 5))
    from matplotlib.colors import LogNorm
    im = ax.imshow(np.maximum(values, 1e-2), aspect="auto", cmap="magma",
                   norm=LogNorm(vmin=max(float(values.min()), 1e-2), vmax=float(values.max())))
    ax.set_yticks(range(len(heat["channels"])), [str(c) for c in heat["channels"]], fontsize=7)
    ax.set_xticks(range(len(heat["tokens"])), heat["tokens"], rotation=90, fontsize=6)
    ax.set(ylabel="channel", title=f"|x| (log colour scale) at {heat['path']}: top channels x "
           "tokens of one text")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    written.append(os.path.join(folder, "channel_token_heatmap.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    sweep = [m for m in report["metrics"] if "per-tensor" in m["config"]]
    for w in sorted({m["weight_bits"] for m in sweep}, reverse=True):
        pts = sorted((m["act_bits"], m) for m in sweep if m["weight_bits"] == w)
        for ax, key in zip(axes, ("recall@1", "cos mean")):
            ax.plot([a for a, _ in pts], [m[key] for _, m in pts], marker="o", label=f"W{w}")
    fp = report["metrics"][0]["recall@1"]
    axes[0].axhline(fp, color="gray", ls="--", label="FP")
    for ax, key in zip(axes, ("retrieval recall@1", "cosine to FP embeddings")):
        ax.set(xlabel="activation bits (per-tensor)", ylabel=key)
        ax.legend()
    fig.tight_layout()
    written.append(os.path.join(folder, "metric_vs_bits.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def report_markdown(report: Mapping[str, Any], title: str) -> str:
    """The report as Markdown tables."""
    sites = sorted(report["sites"], key=lambda r: -r["max |x|"])
    cols = ["layer", "site", "max |x|", "mean inf-norm", "kurtosis", "top channel",
            "peak / median channel"]
    metric_cols = ["config", "recall@1", "recall@10", "mrr", "cos mean", "cos p5"]
    tok_rows = [{**t, "top tokens": ", ".join(t["top tokens"])} for t in report["outlier_tokens"]]
    return "\n\n".join([
        f"# Quantizability report: {title}",
        f"{report['num_articles']} articles (inverse-cloze retrieval); "
        f"{report['probe_texts']} probe texts (the shortest) for the outliers, "
        f"{report['sensitivity_texts']} for the sensitivity; {report['seconds']:.0f} s.",
        "## Task metric: full precision, paper W8A8, per-token, bit-width sweep",
        format_table(report["metrics"], metric_cols),
        "## Sites by max |x| (top 15 of all QuantPoints)",
        format_table(sites[:15], cols),
        "## Top outlier channels and the tokens where they fire (token@position (value))",
        format_table(tok_rows, ["path", "channel", "max |x|", "median channel max",
                                "share of texts peaking at position 0", "top tokens"]),
        "## Sensitivity by kind (cosine to FP embeddings on the probe texts)",
        format_table(report["sensitivity"], ["quantized", "points", "mean", "p5", "min"]),
        "![per-layer outliers](outliers_per_layer.png)\n\n"
        "![channel x token](channel_token_heatmap.png)\n\n![metric vs bits](metric_vs_bits.png)",
    ]) + "\n"


def write_report(report: Mapping[str, Any], folder: str, title: str = "") -> list[str]:
    """Writes report.md, report.json and the three PNGs into `folder`; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    written = _plots(report, folder)
    md = os.path.join(folder, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(report_markdown(report, title))
    write_json(os.path.join(folder, "report.json"), report)
    return [md, os.path.join(folder, "report.json")] + written
