"""The table and curves of finished retrofit workdirs.

    python -m qtransformers.retrofit.report runs/retrofit_* --png docs/img/retrofit_curves.png

Table rows (one per workdir, `after` of final.json; a row 'NAME (step 0)' for its `before` when
measured): steps, [CLS] outlier (site / channel, max|x|), peak / median channel (of that site,
and the largest over all token sites), max kurtosis, FP / W8A8 / W8A{bits} recall@1 and @10,
W8A8's weights alone (W8 only) and activations alone (A8 only) where measured,
W8A8 − FP in points, train seconds; with --baseline (the original's workdir) FP − original in
points and issue 17's three goals met or not (GOALS). Curves: per workdir, the penalty sites'
largest |x| in the training batch, the distillation loss (1 − cos) and, where eval.every was
set, FP / W8A8 recall@1 on the curve articles over the steps (metrics.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping, Sequence

from qtransformers.evaluate.report import format_table

# Issue 17's goals: FP recall@1 at most 1 point below the original's, per-tensor W8A8 recall@1
# within 1 point of FP, max |x| over the median channel's ≤ 50× at every token site.
GOALS = {"fp_drop": 1.0, "w8a8_gap": 1.0, "peak_over_median": 50.0}


def _row(name: str, m: dict[str, Any], steps: int, seconds: float | None) -> dict[str, Any]:
    low = next(k for k in m if k.startswith("w8a") and k != "w8a8")
    split = {f"{k.replace('_only', '').upper()} only R@1": m[k]["recall@1"] if k in m else "-"
             for k in ("w8_only", "a8_only")}
    o = m["outliers"]
    site = o["site"].replace("encoder/", "").replace("layers_", "L")
    return {"setting": name, "steps": steps,
            "outlier (site ch)": f"{site} {o['channel']}", "max |x|": round(o["max_abs"], 1),
            "[CLS] share": o["cls_share"], "peak/median": round(o["peak_over_median"], 1),
            "max peak/median": round(o["max_peak_over_median"], 1),
            "max kurtosis": round(o["max_kurtosis"], 0),
            "FP R@1": m["fp"]["recall@1"], "FP R@10": m["fp"]["recall@10"],
            "W8A8 R@1": m["w8a8"]["recall@1"], "W8A8 R@10": m["w8a8"]["recall@10"],
            f"{low.upper()} R@1": m[low]["recall@1"], **split,
            "W8A8−FP (pt)": round(100 * (m["w8a8"]["recall@1"] - m["fp"]["recall@1"]), 1),
            "train s": "-" if seconds is None else round(seconds)}


def _finished(workdirs: Sequence[str]):
    """(workdir, its final.json) for each finished workdir, in the given order."""
    for w in workdirs:
        path = os.path.join(w, "final.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                yield w, json.load(f)


def goals(row: Mapping[str, Any], baseline_fp: float) -> str:
    """Issue 17's three goals for one table row, as 'FP W8A8 peak' with ✓ / ✗ each: FP recall@1
    at most GOALS['fp_drop'] points below the original's (baseline_fp), W8A8 recall@1 at most
    GOALS['w8a8_gap'] points below the row's FP, max |x| / median ≤ GOALS['peak_over_median']
    at every token site."""
    eps = 1e-9  # recall is a multiple of 1/N: 'at most 1 point' includes exactly 1
    fp_ok = 100 * (baseline_fp - row["FP R@1"]) <= GOALS["fp_drop"] + eps
    w8a8_ok = -row["W8A8−FP (pt)"] <= GOALS["w8a8_gap"] + eps
    peak_ok = row["max peak/median"] <= GOALS["peak_over_median"]
    return " ".join(f"{name}{'✓' if ok else '✗'}" for name, ok in
                    (("FP", fp_ok), ("W8A8", w8a8_ok), ("peak", peak_ok)))


def collect(workdirs: Sequence[str], baseline: str | None = None) -> list[dict[str, Any]]:
    """Table rows of the finished workdirs (those with final.json), in the given order.

    baseline: a finished workdir (e.g. the original, steps=0): adds 'FP−orig (pt)' and the
    'goals' column (goals())."""
    base_fp = None
    if baseline is not None:
        found = list(_finished([baseline]))
        if not found:
            raise ValueError(f"--baseline {baseline} holds no final.json")
        base_fp = found[0][1]["after"]["fp"]["recall@1"]
    rows = []
    for w, final in _finished(workdirs):
        name = os.path.basename(os.path.normpath(w))
        entries = [(f"{name} (step 0)", final["before"], 0, None)] if final.get("before") else []
        entries.append((name, final["after"], final["steps"],
                        final["train_seconds"] if final["steps"] else None))
        for entry in entries:
            row = _row(*entry)
            if base_fp is not None:
                row["FP−orig (pt)"] = round(100 * (row["FP R@1"] - base_fp), 1)
                row["goals"] = goals(row, base_fp)
            rows.append(row)
    return rows


def per_layer_rows(workdirs: Sequence[str], site: str = "mlp_residual") -> list[dict[str, Any]]:
    """One row per finished workdir: max |x| / kurtosis of `site` in every layer (after)."""
    rows = []
    for w, final in _finished(workdirs):
        layers = final["after"]["outliers"]["per_layer"]
        row: dict[str, Any] = {"setting": os.path.basename(os.path.normpath(w))}
        for r in layers:
            if r["site"] == site:
                row[f"L{r['layer']} max|x| / kurt"] = f"{r['max |x|']:.0f} / {r['kurtosis']:.0f}"
        rows.append(row)
    return rows


def plot_curves(workdirs: Sequence[str], png: str) -> str:
    """Writes the training curves of the workdirs to `png`; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for index, w in enumerate(workdirs):
        color = f"C{index % 10}"  # one colour per workdir in every panel
        path = os.path.join(w, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        train = [r for r in rows if r.get("split") == "train"]
        if not train:
            continue
        name = os.path.basename(os.path.normpath(w))
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["batch_max_abs"] for r in train], label=name, color=color)
        axes[1].plot(steps, [max(r.get("embedding", 0.0), 1e-7) for r in train], label=name,
                     color=color)
        curve = [r for r in rows if r.get("split") == "curve"]
        if curve:
            axes[2].plot([r["step"] for r in curve], [r["fp_recall@1"] for r in curve],
                         color=color, label=f"{name} FP")
            axes[2].plot([r["step"] for r in curve], [r["w8a8_recall@1"] for r in curve], "--",
                         color=color, label=f"{name} W8A8")
    axes[0].set(yscale="log", xlabel="step", ylabel="largest |x| in the batch (residual sums)",
                title="Outlier size during the retrofit")
    axes[1].set(yscale="log", xlabel="step", ylabel="1 − cos to the original's embedding",
                title="Distillation loss")
    axes[2].set(xlabel="step", ylabel="recall@1 (eval.curve_articles held-out articles)",
                title="Retrieval during the retrofit (solid FP, dashed W8A8)")
    axes[0].legend(fontsize=6)
    if axes[2].lines:
        axes[2].legend(fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--png", default="")
    parser.add_argument("--baseline", default=None,
                        help="the original's finished workdir: adds FP−orig and the goals column")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.workdirs, args.baseline)
    except ValueError as err:
        parser.exit(2, f"report: {err}; give the original's finished workdir.\n")
    print(format_table(rows, list(rows[0]) if rows else []))
    layers = per_layer_rows(args.workdirs)
    if layers:
        print()
        print(format_table(layers, list(layers[0])))
    if args.png:
        print(f"wrote {plot_curves(args.workdirs, args.png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
