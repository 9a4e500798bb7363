"""The first lines of the reproduce report: four questions answered with the run's numbers.

1. Does the vanilla model have outliers?  2. Do they break quantization, from which bit width?
3. Does each method fix it?  4. At what full-precision cost?

Part 1 (a real pretrained encoder, reproduce.part1) answers with retrieval recall@1; Part 2 (our
models trained from scratch) with the loss change in nats per token (quantized − FP loss; a
perplexity ratio of exp(change)) over the activation bit widths of the bit sweep.
"""
from __future__ import annotations

from typing import Any, Mapping

# A quantized setting "breaks" a model when it costs at least this many nats per token (the
# perplexity grows by >= 5%) or, for retrieval, at least this many points of recall@1.
BREAK_NATS = 0.05
BREAK_RECALL_POINTS = 2.0
# Part 2's goal (issue 18): at A6 or A4, vanilla loses at least this many times more than gated.
GOAL_RATIO = 3.0
GOAL_BITS = (6, 4)
RATIO_FLOOR_NATS = 1e-3  # a method that loses less than this counts as losing this much
HURT_NATS = 0.01  # below this, vanilla is not hurt and a ratio to it says nothing


def _sweep_rows(result: Mapping[str, Any], granularity: str) -> dict[int, dict[str, Any]]:
    sweep = result.get("bit_sweep") or {}
    return {int(r["act_bits"]): r for r in sweep.get("rows", [])
            if r["granularity"] == granularity}


def first_breaking_bits(result: Mapping[str, Any], granularity: str = "per_tensor"
                        ) -> int | None:
    """The largest activation bit width whose loss change is >= BREAK_NATS (None: none)."""
    rows = _sweep_rows(result, granularity)
    broken = [b for b, r in rows.items() if r["loss_change"] >= BREAK_NATS]
    return max(broken) if broken else None


def loss_change(result: Mapping[str, Any], bits: int, granularity: str = "per_tensor"
                ) -> float | None:
    row = _sweep_rows(result, granularity).get(bits)
    return None if row is None else float(row["loss_change"])


def nats(value: float) -> str:
    """A loss change as '+0.127' ('+0.000' for changes that round to zero, never '-0.000')."""
    return "+0.000" if abs(value) < 5e-4 else f"{value:+.3f}"


def _versus(vanilla: float, other: float) -> str:
    if vanilla < HURT_NATS:
        return "vanilla not hurt"
    return f"{ratio(vanilla, other):.1f}x less"


def ratio(vanilla: float, other: float) -> float:
    """vanilla's loss change over another's (floored at RATIO_FLOOR_NATS)."""
    return max(vanilla, 0.0) / max(other, RATIO_FLOOR_NATS)


def goal_status(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """Whether vanilla loses >= GOAL_RATIO x more than gated at A6 or A4 (per-tensor), with
    the ratios; None without a gated run or a sweep."""
    if "gated" not in results or "vanilla" not in results:
        return None
    ratios = {}
    for bits in GOAL_BITS:
        v, g = loss_change(results["vanilla"], bits), loss_change(results["gated"], bits)
        if v is not None and g is not None:
            ratios[bits] = ratio(v, g)
    if not ratios:
        return None
    best = max(ratios, key=ratios.get)
    return dict(ratios=ratios, best_bits=best, best_ratio=ratios[best],
                reached=ratios[best] >= GOAL_RATIO)


def _pct(new: float, old: float) -> str:
    return f"{100.0 * (new / old - 1.0):+.1f}%"


def part1_lines(part1: Mapping[str, Any]) -> list[str]:
    """Answers from the real pretrained model (reproduce.part1's result)."""
    m = part1["minilm"]
    rows = {r["config"]: r for r in m["metrics"]}
    fp = rows["FP"]["recall@1"]
    token_sites = [s for s in m["sites"] if s["site"].rsplit("/", 1)[-1] not in ("scores",
                                                                                 "probs")]
    worst = max(token_sites, key=lambda s: s["max |x|"])
    where = ""
    for t in m.get("outlier_tokens", []):
        if t["path"] == worst["path"] and t["channel"] == worst["top channel"]:
            share = t["share of texts peaking at position 0"]
            where = (f", peaking at position 0 ([CLS]) in {100 * share:.0f}% of texts"
                     if share >= 0.5 else f", at tokens {', '.join(t['top tokens'][:3])}")
    name = m.get("checkpoint", "the pretrained model")
    lines = [f"**Part 1, a real pretrained model ({name}, {m['num_articles']} Wikipedia "
             "articles, retrieval recall@1):**",
             f"- Outliers: **yes**. max |x| {worst['max |x|']:.0f} at layer {worst['layer']} "
             f"`{worst['site']}`, channel {worst['top channel']} "
             f"({worst['peak / median channel']:.0f}x the median channel's max){where}; "
             f"kurtosis {worst['kurtosis']:.0f} (Gaussian = 3)."]
    quant = [r for r in m["metrics"] if r["config"] != "FP"]
    parts = []
    for r in quant:
        drop = 100.0 * (fp - r["recall@1"])
        parts.append(f"{r['config']} {r['recall@1']:.3f} ({-drop:+.1f} points)")
    broken = [r for r in quant if r["granularity"] == "per_tensor"
              and 100.0 * (fp - r["recall@1"]) >= BREAK_RECALL_POINTS]
    verdict = (f"per-tensor quantization breaks it from {max(r['act_bits'] for r in broken)} "
               "activation bits" if broken else "no per-tensor setting measured breaks it")
    lines.append(f"- Quantization: FP recall@1 {fp:.3f}; " + "; ".join(parts) + f". So {verdict}"
                 f" (break = {BREAK_RECALL_POINTS:g}+ points lost).")
    retro = part1.get("retrofit") or {}
    if retro:
        from qtransformers.reproduce.part1 import retrofit_row
        bits = []
        for method, entry in retro.items():
            if entry.get("status") != "done":
                bits.append(f"{method}: not run ({entry.get('reason', entry.get('status'))})")
                continue
            r = retrofit_row(entry)
            if r["fp"] is None or r["w8a8"] is None:
                bits.append(f"{method}: done, but its result names no recall@1 (see part1/)")
                continue
            fixed = 100.0 * (r["fp"] - r["w8a8"]) < BREAK_RECALL_POINTS
            bits.append(f"{method}: FP {r['fp']:.3f} ({100 * (r['fp'] - fp):+.1f} points vs the "
                        f"original), W8A8 per-tensor {r['w8a8']:.3f} -> "
                        f"{'fixed' if fixed else 'NOT fixed'}"
                        + (f", max |x| {r['max_abs']:.0f}" if r["max_abs"] else ""))
        lines.append("- Retrofits (short fine-tunes of the pretrained model): " + "; ".join(bits)
                     + ".")
    return lines


def part2_lines(results: Mapping[str, Mapping[str, Any]], metric: str,
                verdict: Mapping[str, Any] | None) -> list[str]:
    """Answers from the models trained from scratch (method -> combined result)."""
    vanilla = results.get("vanilla")
    if vanilla is None:
        return []
    out = vanilla["outliers"]
    lines = ["**Part 2, our models trained from scratch (held-out "
             f"{metric}; loss change = quantized − FP loss in nats per token):**"]
    if verdict is not None:
        lines.append(f"- Outliers: **{'yes' if verdict['developed'] else 'weak'}**. vanilla "
                     f"max |x| {out['max_inf_norm']:.1f} = {verdict['peak_to_median']:.0f}x the "
                     f"median |x|, avg kurtosis {out['avg_kurtosis']:.1f} (Gaussian = 3).")
    has_sweep = bool(vanilla.get("bit_sweep"))
    if has_sweep:
        rows = _sweep_rows(vanilla, "per_tensor")
        changes = ", ".join(f"A{b} {nats(rows[b]['loss_change'])}"
                            for b in sorted(rows, reverse=True))
        first = first_breaking_bits(vanilla)
        tok = _sweep_rows(vanilla, "per_token")
        tok_text = (", per-token " + ", ".join(f"A{b} {nats(tok[b]['loss_change'])}"
                                              for b in sorted(tok, reverse=True))) if tok else ""
        lines.append(f"- Quantization (vanilla, W8, per-tensor activations): {changes}{tok_text}."
                     " " + (f"It breaks (>= {BREAK_NATS:g} nats) from **A{first}** down."
                            if first else f"No bit width measured costs >= {BREAK_NATS:g} nats."))
    else:
        w = vanilla["w8a8"]
        lines.append(f"- Quantization: W8A8 costs vanilla {w['loss_change']:+.4f} nats "
                     "(no bit sweep in this config).")
    fixes = []
    for method, result in results.items():
        if method == "vanilla":
            continue
        if has_sweep and result.get("bit_sweep"):
            cells = []
            for bits in GOAL_BITS:
                v, o = loss_change(vanilla, bits), loss_change(result, bits)
                if v is not None and o is not None:
                    cells.append(f"A{bits} {nats(o)} vs {nats(v)} ({_versus(v, o)})")
            fixes.append(f"{method}: " + ", ".join(cells))
        else:
            fixes.append(f"{method}: W8A8 {result['w8a8']['loss_change']:+.4f} nats vs "
                         f"{vanilla['w8a8']['loss_change']:+.4f}")
    if fixes:
        lines.append("- Each method (loss change, method vs vanilla): " + "; ".join(fixes) + ".")
    goal = goal_status(results)
    if goal is not None:
        shown = ", ".join(f"A{b} {r:.1f}x" for b, r in goal["ratios"].items())
        lines.append(f"- Goal (vanilla loses >= {GOAL_RATIO:g}x more than gated at A6 or A4): "
                     f"{'**reached**' if goal['reached'] else '**not reached**'} ({shown}).")
    cost = [f"{m} {r['fp'][metric]:.2f} ({_pct(r['fp'][metric], vanilla['fp'][metric])})"
            for m, r in results.items() if m != "vanilla"]
    if cost:
        lines.append(f"- Full-precision cost: vanilla {metric} {vanilla['fp'][metric]:.2f}; "
                     + ", ".join(cost) + ".")
    return lines


def answer_lines(part1: Mapping[str, Any] | None, results: Mapping[str, Mapping[str, Any]],
                 metric: str, verdict: Mapping[str, Any] | None) -> list[str]:
    """The report's opening lines (Markdown), Part 1 then Part 2."""
    lines: list[str] = []
    if part1:
        lines += part1_lines(part1) + [""]
    lines += part2_lines(results, metric, verdict)
    return lines

