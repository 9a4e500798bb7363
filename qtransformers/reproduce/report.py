"""report.md / report.json of a reproduce run: the paper-style table next to the paper's numbers,
and a plain statement of whether the vanilla model developed outliers at all."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

# Paper Table 2 (paper.md §7): FP, max inf-norm, avg kurtosis, W8A8 (ppl, or top-1 % for ViT).
PAPER_TABLE: dict[str, dict[str, dict[str, float]]] = {
    "bert": {"vanilla": dict(fp=4.49, max_inf_norm=735, avg_kurtosis=3076, w8a8=1294),
             "clipped": dict(fp=4.39, max_inf_norm=21.5, avg_kurtosis=80, w8a8=4.52),
             "gated": dict(fp=4.45, max_inf_norm=39.2, avg_kurtosis=201, w8a8=4.65)},
    "opt": {"vanilla": dict(fp=15.84, max_inf_norm=340, avg_kurtosis=1778, w8a8=21.18),
            "clipped": dict(fp=16.29, max_inf_norm=63.2, avg_kurtosis=19728, w8a8=37.20),
            "gated": dict(fp=15.55, max_inf_norm=8.7, avg_kurtosis=18.9, w8a8=16.02)},
    "vit": {"vanilla": dict(fp=80.75, max_inf_norm=359, avg_kurtosis=1018, w8a8=69.24),
            "clipped": dict(fp=80.89, max_inf_norm=73.7, avg_kurtosis=22.9, w8a8=79.77),
            "gated": dict(fp=81.01, max_inf_norm=79.8, avg_kurtosis=19.9, w8a8=79.82)},
}
PAPER_MODEL = {"bert": "BERT-base (ppl)", "opt": "OPT-125m (ppl)", "vit": "ViT-S/16 (top-1 %)"}

# "Developed outliers": kurtosis well above a Gaussian's 3 and a peak many medians high.
OUTLIER_KURTOSIS_MIN = 10.0
OUTLIER_PEAK_TO_MEDIAN_MIN = 20.0


def outlier_verdict(vanilla: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the vanilla model developed outliers, with the numbers the verdict rests on.

    Args:
      vanilla: a method result with outliers.avg_kurtosis, outliers.max_inf_norm and
        outliers.median_abs.
    """
    out = vanilla["outliers"]
    ratio = out["max_inf_norm"] / max(out["median_abs"], 1e-12)
    developed = (out["avg_kurtosis"] >= OUTLIER_KURTOSIS_MIN
                 and ratio >= OUTLIER_PEAK_TO_MEDIAN_MIN)
    text = (f"The vanilla model {'DID' if developed else 'did NOT'} develop outliers: avg "
            f"kurtosis {out['avg_kurtosis']:.1f} (Gaussian = 3; threshold "
            f"{OUTLIER_KURTOSIS_MIN:g}) and max |x| {out['max_inf_norm']:.1f} = {ratio:.0f}x "
            f"the median |x| {out['median_abs']:.3g} (threshold {OUTLIER_PEAK_TO_MEDIAN_MIN:g}x).")
    if not developed:
        text += (" Without outliers in the vanilla model there is nothing for clipped softmax "
                 "or gated attention to fix, so the method comparison below means little: "
                 "train longer or use a preset that grows outliers faster (`--config "
                 "configs/reproduce.py:wikitext_h8`; measurements in docs/results.md).")
    return dict(developed=developed, peak_to_median=ratio, text=text)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


def build_report(family: str, metric_name: str, results: Mapping[str, Mapping[str, Any]],
                 run_info: Mapping[str, Any], figures: Mapping[str, str]) -> dict[str, Any]:
    """The report as a JSON-serialisable dict (also the source of report.md).

    Args:
      family: "bert" | "opt" | "vit" (picks the paper's rows).
      metric_name: "perplexity" or "accuracy".
      results: method -> result dict (fp, outliers, w8a8, ...) from reproduce.analysis.
      run_info: command, config, machine, wall times.
      figures: figure name -> file name relative to the report.
    """
    verdict = outlier_verdict(results["vanilla"]) if "vanilla" in results else None
    rows = []
    for method, result in results.items():
        rows.append(dict(
            method=method, fp=result["fp"][metric_name],
            max_inf_norm=result["outliers"]["max_inf_norm"],
            avg_kurtosis=result["outliers"]["avg_kurtosis"],
            w8a8_mean=result["w8a8"]["mean"], w8a8_std=result["w8a8"]["std"],
            w8a8_gap=result["w8a8"]["mean"] - result["fp"][metric_name],
            w8a8_loss_change=result["w8a8"].get("loss_change"),
            seeds=result.get("seeds", 1)))
    return dict(family=family, metric=metric_name, rows=rows, verdict=verdict,
                paper=dict(model=PAPER_MODEL[family], rows=PAPER_TABLE[family]),
                run=dict(run_info), figures=dict(figures), results=results)


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md text from `build_report`'s dict."""
    metric = report["metric"]
    lines = ["# qtransformers reproduce report", ""]
    if report["verdict"]:
        lines += ["## Did the vanilla model develop outliers?", "", report["verdict"]["text"], ""]
    seeds = max((row.get("seeds", 1) for row in report["rows"]), default=1)
    pooled = (f"means over {seeds} training seeds; W8A8 = mean ± std over training × PTQ seeds"
              if seeds > 1 else "W8A8 = mean ± std over PTQ seeds")
    lines += [f"## Our run ({metric}; {pooled})", "",
              f"| method | FP {metric} | max inf-norm | avg kurtosis | W8A8 {metric} | "
              "W8A8 − FP | W8A8 loss change (nats) |", "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['method']} | {_fmt(row['fp'], 3)} | {_fmt(row['max_inf_norm'])} | "
                     f"{_fmt(row['avg_kurtosis'])} | {_fmt(row['w8a8_mean'], 3)} ± "
                     f"{_fmt(row['w8a8_std'], 3)} | {row['w8a8_gap']:+.4f} | "
                     f"{_signed(row.get('w8a8_loss_change'))} |")
    paper = report["paper"]
    lines += ["", f"## The paper's numbers for the same family: {paper['model']} (Table 2)", "",
              "| method | FP | max inf-norm | avg kurtosis | W8A8 |", "|---|---|---|---|---|"]
    for method, row in paper["rows"].items():
        lines.append(f"| {method} | {row['fp']} | {row['max_inf_norm']} | {row['avg_kurtosis']} | "
                     f"{row['w8a8']} |")
    lines += ["", "Kurtosis is non-excess (Gaussian = 3), averaged over samples then over the "
              "tracked tensors; max inf-norm is the per-sample max |x| averaged over samples, "
              "then the max over tracked tensors (paper.md §5). Our model is far smaller and "
              "shorter-trained than the paper's, so compare directions, not magnitudes.", ""]
    if report["figures"]:
        lines += ["## Figures" + (" (the first training seed's runs)" if seeds > 1 else ""), ""]
        lines += [f"![{name}]({file})" for name, file in report["figures"].items()]
        lines.append("")
    run = report["run"]
    lines += ["## How this was run", "", f"- command: `{run.get('command', '')}`"]
    lines += [f"- {key}: {value}" for key, value in run.items() if key not in ("command", "config")]
    if "config" in run:
        lines.append("- config: the full experiment config is `run.config` in report.json")
    return "\n".join(lines) + "\n"


def write_report(workdir: str, report: Mapping[str, Any]) -> tuple[str, str]:
    """Writes report.json and report.md into `workdir`; returns their paths."""
    json_path = os.path.join(workdir, "report.json")
    md_path = os.path.join(workdir, "report.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1, default=float)
    with open(md_path, "w") as f:
        f.write(render_markdown(report))
    return md_path, json_path
