"""report.md / report.json of a reproduce run: the paper-style table next to the paper's numbers,
and a plain statement of whether the vanilla model developed outliers at all."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from qtransformers.reproduce.answers import answer_lines, goal_status, nats

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
# Paper Table 8 (paper.md §7, low bit widths, MSE ranges): BERT-base perplexity per method.
PAPER_LOW_BIT = {"FP": dict(vanilla=4.49, clipped=4.39, gated=4.45),
                 "W6A8": dict(vanilla=6.49, clipped=4.56, gated=4.71),
                 "W4A8": dict(vanilla=6.52, clipped=4.90, gated=5.02),
                 "W6A6": dict(vanilla=42.8, clipped=6.64, gated=5.90)}
# What to try next when a preset's vanilla model grows no outliers: never the preset itself.
NEXT_STEP = {
    "wikitext_h8": "a longer run on a larger corpus, on a GPU (`--config "
                   "configs/reproduce.py:gpu`; docs/results.md §6.5)",
    "wikitext_long": "a larger corpus on a GPU (`--config configs/reproduce.py:gpu`; "
                     "docs/results.md §6.5)",
    "gpu": "the paper's recipe (`--config configs/reproduce.py:opt_125m`, docs/scaling.md)",
}
DEFAULT_NEXT_STEP = ("a setting that grows outliers faster (8 narrow heads on more text: "
                     "`--config configs/reproduce.py:wikitext_h8`; docs/results.md §6)")

# "Developed outliers": kurtosis well above a Gaussian's 3 and a peak many medians high.
OUTLIER_KURTOSIS_MIN = 10.0
OUTLIER_PEAK_TO_MEDIAN_MIN = 20.0


def next_step(preset: str | None) -> str:
    """What to try when `preset`'s vanilla model grows no outliers (never `preset` itself)."""
    return NEXT_STEP.get(preset or "", DEFAULT_NEXT_STEP)


def outlier_verdict(vanilla: Mapping[str, Any], preset: str | None = None) -> dict[str, Any]:
    """Whether the vanilla model developed outliers, with the numbers the verdict rests on.

    Args:
      vanilla: a method result with outliers.avg_kurtosis, outliers.max_inf_norm and
        outliers.median_abs.
      preset: the name of the preset the run was made with (config.reproduce.preset), so that
        the advice never names it.
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
                 "or gated attention to fix at 8 bits, so the W8A8 comparison below means "
                 f"little: train longer or try {next_step(preset)}.")
    return dict(developed=developed, peak_to_median=ratio, text=text)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.4f}"


def build_report(family: str, metric_name: str, results: Mapping[str, Mapping[str, Any]],
                 run_info: Mapping[str, Any], figures: Mapping[str, str], *,
                 part1: Mapping[str, Any] | None = None,
                 preset: str | None = None) -> dict[str, Any]:
    """The report as a JSON-serialisable dict (also the source of report.md).

    Args:
      family: "bert" | "opt" | "vit" (picks the paper's rows).
      metric_name: "perplexity" or "accuracy".
      results: method -> result dict (fp, outliers, w8a8, optional bit_sweep, ...).
      run_info: command, config, machine, wall times.
      figures: figure name -> file name relative to the report.
      part1: reproduce.part1's result (the real pretrained model), or None.
      preset: the config's preset name (config.reproduce.preset), for the verdict's advice.
    """
    verdict = outlier_verdict(results["vanilla"], preset) if "vanilla" in results else None
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
                answers=answer_lines(part1, results, metric_name, verdict),
                goal=goal_status(results), part1=part1, preset=preset,
                paper=dict(model=PAPER_MODEL[family], rows=PAPER_TABLE[family],
                           low_bit=PAPER_LOW_BIT),
                run=dict(run_info), figures=dict(figures), results=results)


def _sweep_table(report: Mapping[str, Any]) -> list[str]:
    """Part 2's bit sweep: one row per method, loss change (nats) per setting."""
    metric = report["metric"]
    sweeps = {m: r["bit_sweep"] for m, r in report["results"].items() if r.get("bit_sweep")}
    if not sweeps:
        return []
    first = next(iter(sweeps.values()))
    keys = [(r["act_bits"], r["granularity"]) for r in first["rows"]]
    head = [f"A{b} {'per-token' if g == 'per_token' else 'per-tensor'}" for b, g in keys]
    lines = [f"### Bit-width sweep (W{first['weight_bits']}, preset `{first.get('preset', '')}` "
             f"with the activation bits replaced; {metric}, and in brackets the loss change "
             "vs the method's own FP, nats per token)", "",
             f"| method | FP {metric} | " + " | ".join(head) + " |",
             "|---|---|" + "---|" * len(head)]
    for method, sweep in sweeps.items():
        cells = {(r["act_bits"], r["granularity"]): r for r in sweep["rows"]}
        lines.append(f"| {method} | {_fmt(sweep['fp'][metric], 2)} | " + " | ".join(
            f"{_fmt(cells[k][metric], 2)} ({nats(cells[k]['loss_change'])})" if k in cells
            else "—" for k in keys) + " |")
    low = report["paper"]["low_bit"]
    lines += ["", "The paper's low-bit numbers (BERT-base, MSE ranges, Table 8; perplexity, "
              "and in brackets the loss change vs FP in nats = ln(quantized / FP ppl)):", "",
              "| method | FP | " + " | ".join(k for k in low if k != "FP") + " |",
              "|---|---|" + "---|" * (len(low) - 1)]
    for method in ("vanilla", "clipped", "gated"):
        fp = low["FP"][method]
        lines.append(f"| {method} | {fp} | " + " | ".join(
            f"{row[method]} ({math.log(row[method] / fp):+.2f})"
            for k, row in low.items() if k != "FP") + " |")
    lines += ["", "The paper's W6A6 costs vanilla BERT 2.25 nats and gated attention 0.28 (8x "
              "less). Our models are ~1,000x smaller and trained ~1,000x shorter: compare the "
              "ratio between methods, not the magnitudes.", ""]
    return lines


def _part1_section(part1: Mapping[str, Any], figures: Mapping[str, str]) -> list[str]:
    m = part1["minilm"]
    lines = [f"## Part 1: a real pretrained model ({m.get('checkpoint', '')})", "",
             f"Inverse-cloze retrieval over {m['num_articles']} Wikipedia summaries (query = "
             "first sentence, document = the rest), weights W8 per-tensor; "
             f"{m.get('seconds', 0):.0f} s.", "",
             "| config | recall@1 | recall@10 | MRR | cosine to FP |", "|---|---|---|---|---|"]
    for r in m["metrics"]:
        lines.append(f"| {r['config']} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | "
                     f"{r['mrr']:.3f} | {r['cos mean']:.3f} |")
    sites = sorted((s for s in m["sites"] if s["site"].rsplit("/", 1)[-1]
                    not in ("scores", "probs")), key=lambda s: -s["max |x|"])[:6]
    lines += ["", "Where the outliers are (sites by max |x| over the probe texts):", "",
              "| layer | site | max \\|x\\| | kurtosis | top channel | peak / median channel |",
              "|---|---|---|---|---|---|"]
    for s in sites:
        lines.append(f"| {s['layer']} | `{s['site']}` | {s['max |x|']:.1f} | "
                     f"{s['kurtosis']:.0f} | {s['top channel']} | "
                     f"{s['peak / median channel']:.0f}x |")
    if m.get("outlier_tokens"):
        lines += ["", "| site | channel | share of texts peaking at [CLS] | top tokens "
                  "(token@position (value)) |", "|---|---|---|---|"]
        for t in m["outlier_tokens"]:
            lines.append(f"| `{t['path']}` | {t['channel']} | "
                         f"{100 * t['share of texts peaking at position 0']:.0f}% | "
                         f"{', '.join(t['top tokens'][:4])} |")
    retro = part1.get("retrofit") or {}
    if retro:
        from qtransformers.reproduce.part1 import retrofit_row
        lines += ["", "Retrofitted models (issue 17: short fine-tunes of the same model):", "",
                  "| method | status | FP recall@1 | W8A8 per-tensor recall@1 | max \\|x\\| |",
                  "|---|---|---|---|---|"]
        for method, entry in retro.items():
            r = retrofit_row(entry) if entry.get("status") == "done" else {}
            lines.append(f"| {method} | {entry.get('status')}"
                         f"{': ' + entry['reason'] if entry.get('reason') else ''} | "
                         f"{_fmt(r.get('fp'), 3)} | {_fmt(r.get('w8a8'), 3)} | "
                         f"{_fmt(r.get('max_abs'), 1)} |")
    shown = [f"![{n}]({f})" for n, f in figures.items() if n.startswith("part 1")]
    return lines + [""] + shown + [""]


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md text from `build_report`'s dict."""
    metric = report["metric"]
    lines = ["# qtransformers reproduce report", ""]
    if report.get("answers"):
        lines += ["## The answers", ""] + list(report["answers"]) + [""]
    figures = report["figures"]
    sub = "###" if report.get("part1") else "##"  # Part 2's sections nest under its heading
    if report.get("part1"):
        lines += _part1_section(report["part1"], figures)
        lines += ["## Part 2: vanilla, clipped softmax and gated attention trained from scratch",
                  ""]
    if report["verdict"]:
        lines += [f"{sub} Did the vanilla model develop outliers?", "", report["verdict"]["text"],
                  ""]
    seeds = max((row.get("seeds", 1) for row in report["rows"]), default=1)
    pooled = (f"means over {seeds} training seeds; W8A8 = mean ± std over training × PTQ seeds"
              if seeds > 1 else "W8A8 = mean ± std over PTQ seeds")
    lines += [f"{sub} Our run ({metric}; {pooled})", "",
              f"| method | FP {metric} | max inf-norm | avg kurtosis | W8A8 {metric} | "
              "W8A8 − FP | W8A8 loss change (nats) |", "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['method']} | {_fmt(row['fp'], 3)} | {_fmt(row['max_inf_norm'])} | "
                     f"{_fmt(row['avg_kurtosis'])} | {_fmt(row['w8a8_mean'], 3)} ± "
                     f"{_fmt(row['w8a8_std'], 3)} | {row['w8a8_gap']:+.4f} | "
                     f"{_signed(row.get('w8a8_loss_change'))} |")
    lines += [""] + _sweep_table(report)
    paper = report["paper"]
    lines += [f"{sub} The paper's numbers for the same family: {paper['model']} (Table 2)", "",
              "| method | FP | max inf-norm | avg kurtosis | W8A8 |", "|---|---|---|---|---|"]
    for method, row in paper["rows"].items():
        lines.append(f"| {method} | {row['fp']} | {row['max_inf_norm']} | {row['avg_kurtosis']} | "
                     f"{row['w8a8']} |")
    lines += ["", "Kurtosis is non-excess (Gaussian = 3), averaged over samples then over the "
              "tracked tensors; max inf-norm is the per-sample max |x| averaged over samples, "
              "then the max over tracked tensors (paper.md §5). Our model is far smaller and "
              "shorter-trained than the paper's, so compare directions, not magnitudes.", ""]
    part2_figures = {n: f for n, f in figures.items() if not n.startswith("part 1")}
    if part2_figures:
        lines += [f"{sub} Figures" + (" (the first training seed's runs)" if seeds > 1 else ""), ""]
        lines += [f"![{name}]({file})" for name, file in part2_figures.items()]
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
