"""PNG figures of a reproduce run (matplotlib, Agg backend). Each function writes one file.

Inputs are the per-method result dicts produced by `reproduce.analysis` (see its docstrings).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METHOD_COLOURS = {"vanilla": "#444444", "clipped": "#1f77b4", "gated": "#d62728",
                  "clipped_a2": "#6baed6", "clipped_a12": "#08306b", "gated_pi05": "#fb6a4a",
                  "gated_mlp": "#67000d"}
OTHER_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def _colour(method: str) -> str:
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return OTHER_COLOURS[sum(map(ord, method)) % len(OTHER_COLOURS)]


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _readable_log_axis(ax) -> None:
    """Log y axis labelled at 1, 2, 5 x 10^k (not one tick per decade)."""
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_per_layer(results: Mapping[str, Mapping[str, Any]], path: str) -> str:
    """Per-layer max |x| and kurtosis of each layer's output, one line per method."""
    fig, (ax_inf, ax_kurt) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, result in results.items():
        layers = result["outliers"]["per_layer"]
        idx = [row["layer"] for row in layers]
        ax_inf.plot(idx, [row["inf_norm"] for row in layers], "o-", label=method,
                    color=_colour(method))
        ax_kurt.plot(idx, [row["kurtosis"] for row in layers], "o-", label=method,
                     color=_colour(method))
    ax_inf.set(title="max |x| of each layer's output", xlabel="layer", ylabel="inf-norm")
    ax_kurt.set(title="kurtosis of each layer's output (Gaussian = 3)", xlabel="layer",
                ylabel="kurtosis", yscale="log")
    ax_kurt.axhline(3.0, color="grey", lw=0.8, ls=":")
    _readable_log_axis(ax_kurt)
    for ax in (ax_inf, ax_kurt):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_inf.legend()
    return _save(fig, path)


def plot_training_curves(results: Mapping[str, Mapping[str, Any]], path: str) -> str:
    """The emergence of outliers over training, one line per method: avg kurtosis, max
    inf-norm, max |x| at the first token (solid) vs elsewhere (dashed), and the attention share
    on the first token."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    (ax_kurt, ax_inf), (ax_pos, ax_att) = axes
    for method, result in results.items():
        history = result.get("history") or []
        colour = _colour(method)

        def curve(ax, key, style="o-", label=method):
            rows = [row for row in history if key in row]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=label,
                        color=colour, ms=3)

        curve(ax_kurt, "avg_kurtosis")
        curve(ax_inf, "max_inf_norm")
        curve(ax_pos, "first_token_max_abs", "o-", f"{method}: first token")
        curve(ax_pos, "rest_max_abs", "x--", f"{method}: elsewhere")
        curve(ax_att, "first_token_attention")
    ax_kurt.set(title="avg kurtosis over training", xlabel="step", ylabel="kurtosis")
    ax_inf.set(title="max inf-norm over training", xlabel="step", ylabel="max |x|")
    ax_pos.set(title="max |x| at the first token vs elsewhere", xlabel="step",
               ylabel="max |x|")
    ax_att.set(title="attention on the first token (mean over layers, heads)", xlabel="step",
               ylabel="share", ylim=(0, 1))
    for ax in axes.flat:
        if ax.has_data():
            ax.legend(fontsize=7)
    return _save(fig, path)


SPECIAL_LABELS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")


def _label_ticks(ax, tokens: Sequence[str], axis: str, fontsize: float) -> None:
    """Every token as a tick label (specials in red, so [SEP] columns stand out)."""
    positions = list(range(len(tokens)))
    labels = [t if len(t) <= 10 else t[:9] + "…" for t in tokens]
    if axis == "x":
        ax.set_xticks(positions, labels, rotation=90, fontsize=fontsize)
        ticklabels = ax.get_xticklabels()
    else:
        ax.set_yticks(positions, labels, fontsize=fontsize)
        ticklabels = ax.get_yticklabels()
    for label, token in zip(ticklabels, tokens):
        if token in SPECIAL_LABELS:
            label.set_color("#d62728")
            label.set_fontweight("bold")


def plot_attention_maps(method: str, attention: Mapping[str, Any], path: str) -> str:
    """Attention probabilities of one sequence for the most outlier-prone heads, every token
    labelled ([CLS] / [SEP] / [UNK] in red, distinct from real text), one colour bar."""
    heads = attention["heads"]
    tokens: Sequence[str] = attention["tokens"]
    cols = max(len(heads), 1)
    size = min(4.2 + 0.075 * len(tokens), 9.0)
    fontsize = 7 if len(tokens) <= 24 else 5 if len(tokens) <= 48 else 4
    fig, axes = plt.subplots(1, cols, figsize=(size * cols + 1.0, size), squeeze=False)
    image = None
    for ax, head in zip(axes[0], heads):
        probs = np.asarray(head["probs"])
        image = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"{method}: layer {head['layer']} head {head['head']}\n"
                     f"attention on the first token {head['first_token_share']:.2f}",
                     fontsize=9)
        _label_ticks(ax, tokens, "x", fontsize)
        _label_ticks(ax, tokens, "y", fontsize)
        ax.set_xlabel("key")
    axes[0][0].set_ylabel("query")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), fraction=0.02, pad=0.01,
                     label="attention probability")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_bit_sweep(results: Mapping[str, Mapping[str, Any]], path: str) -> str:
    """Robustness curves: loss change (nats, symlog) and the metric against activation bits,
    one colour per method, solid per-tensor, dashed per-token."""
    fig, (ax_change, ax_metric) = plt.subplots(1, 2, figsize=(11, 4.2))
    bits_seen: set[int] = set()
    metric = "perplexity"
    for method, result in results.items():
        sweep = result.get("bit_sweep")
        if not sweep:
            continue
        metric = sweep["metric"]
        for granularity, style in (("per_tensor", "o-"), ("per_token", "s--")):
            rows = sorted((r for r in sweep["rows"] if r["granularity"] == granularity),
                          key=lambda r: -r["act_bits"])
            if not rows:
                continue
            bits = [r["act_bits"] for r in rows]
            bits_seen.update(bits)
            label = f"{method} {granularity.replace('_', '-')}"
            ax_change.plot(bits, [r["loss_change"] for r in rows], style, color=_colour(method),
                           label=label, ms=4)
            ax_metric.plot(bits, [r[metric] for r in rows], style, color=_colour(method),
                           label=label, ms=4)
        ax_metric.axhline(sweep["fp"][metric], color=_colour(method), lw=0.8, ls=":")
    ax_change.set_yscale("symlog", linthresh=0.01)
    ax_change.axhline(0.05, color="grey", lw=0.8, ls=":")
    ax_change.set(title="loss change vs FP (nats per token; dotted: 0.05)",
                  xlabel="activation bits (weights 8-bit)", ylabel="quantized − FP loss")
    ax_metric.set(title=f"{metric} (dotted: each method's FP)",
                  xlabel="activation bits (weights 8-bit)", ylabel=metric, yscale="log")
    ax_metric.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_metric.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    for ax in (ax_change, ax_metric):
        if bits_seen:
            ax.set_xticks(sorted(bits_seen))
            ax.set_xlim(max(bits_seen) + 0.3, min(bits_seen) - 0.3)  # fewer bits to the right
        ax.grid(alpha=0.3)
    ax_change.legend(fontsize=7)
    return _save(fig, path)


def plot_gate_distribution(gates: Mapping[str, Any], path: str) -> str:
    """Histogram of gate values sigmoid(G(x)) per layer of a gated model."""
    per_layer = gates["per_layer"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    bins = np.linspace(0.0, 1.0, 41)
    for row in per_layer:
        ax.hist(row["values"], bins=bins, histtype="step", label=f"layer {row['layer']}",
                density=True)
    ax.set(title="gate values sigmoid(G(x))", xlabel="gate value", ylabel="density")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_outlier_channels(results: Mapping[str, Mapping[str, Any]], path: str) -> str:
    """Top outlier channels of the last layer's output and the token positions where they fire."""
    fig, (ax_chan, ax_pos) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(len(results), 1)
    for i, (method, result) in enumerate(results.items()):
        channels = result["channels"]
        top = channels["top"]
        x = np.arange(len(top)) + i * width
        ax_chan.bar(x, [c["max_abs"] for c in top], width=width, label=method,
                    color=_colour(method))
        profile = np.asarray(channels["position_max_abs"])
        ax_pos.plot(np.arange(len(profile)), profile, label=method, color=_colour(method))
    ax_chan.set(title="top channels by max |x| (last layer output)", xlabel="rank",
                ylabel="max |x|")
    ax_pos.set(title="max |x| over top channels by token position", xlabel="position",
               ylabel="max |x|")
    ax_chan.legend()
    return _save(fig, path)
