"""Text tables and JSON for PTQ / outlier results (the paper's Table 2 columns)."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of `rows` (dicts); floats get 4 significant digits."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(vals: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep] + [line(r) for r in cells])


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(value)


def ptq_row(name: str, ptq: Mapping[str, Any], outliers: Mapping[str, Any] | None,
            bits_label: str = "W8A8") -> dict[str, Any]:
    """One Table-2 row: FP metric, max inf-norm, avg kurtosis, quantized mean ± std."""
    metric = ptq["metric"]
    q = ptq["quantized"]
    # accuracy is a fraction everywhere (models.tasks); the table prints a percentage
    scale, unit = (100.0, " (%)") if metric == "accuracy" else (1.0, "")
    row = {"model": name, f"FP {metric}{unit}": scale * ptq["fp"][metric]}
    if outliers is not None:
        row["max inf-norm"] = outliers["max_inf_norm"]
        row["avg kurtosis"] = outliers["avg_kurtosis"]
    row[f"{bits_label} {metric}{unit}"] = f"{_fmt(scale * q['mean'])} ± {_fmt(scale * q['std'])}"
    return row


def per_layer_rows(outliers: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (layer, tensor, inf-norm, kurtosis, excess kurtosis, top channels) per tensor."""
    rows = []
    channels = outliers.get("channels", {})
    for layer, sites in outliers["per_layer"].items():
        for site, entry in sites.items():
            path = site if layer == "other" else None
            full = path or next((p for p in channels if p.endswith(f"layers_{layer}/{site}")), site)
            top = channels.get(full, {}).get("top_channels", [])
            rows.append({"layer": layer, "tensor": site, "inf-norm": entry["inf_norm"],
                         "kurtosis": entry.get("kurtosis", ""),
                         "excess kurtosis": entry.get("excess_kurtosis", ""),
                         "top channels": ",".join(str(c) for c in top[:3])})
    return rows


def to_jsonable(obj: Any) -> Any:
    """Nested dicts / lists with numpy and jax scalars / arrays turned into Python values."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        arr = np.asarray(obj)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return str(obj)
    return obj


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` (see to_jsonable) as indented JSON, creating the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(obj), f, indent=2)
