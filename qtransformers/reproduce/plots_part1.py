"""Part 1's figures (the real pretrained model): per-layer outliers by site, and the top
outlier channels x the tokens of one text. Input: reproduce.part1.measure_encoder's dict."""
from __future__ import annotations

import os
from typing import Any, Mapping

from qtransformers.reproduce.plots import _label_ticks, _readable_log_axis, _save, plt

import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402


def plot_encoder_layers(minilm: Mapping[str, Any], path: str, max_sites: int = 6) -> str:
    """max |x| and kurtosis per layer for the sites with the largest max |x| (log axes with
    ticks at 1, 2, 5 x 10^k)."""
    kinds: dict[str, dict[int, Mapping[str, Any]]] = {}
    for row in minilm["sites"]:
        if row["layer"] != "-" and row["site"].rsplit("/", 1)[-1] not in ("scores", "probs"):
            kinds.setdefault(row["site"], {})[int(row["layer"])] = row
    order = sorted(kinds, key=lambda k: -max(r["max |x|"] for r in kinds[k].values()))
    fig, (ax_max, ax_kurt) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in order[:max_sites]:
        layers = sorted(kinds[kind])
        ax_max.plot(layers, [kinds[kind][i]["max |x|"] for i in layers], "o-", label=kind)
        ax_kurt.plot(layers, [max(kinds[kind][i]["kurtosis"], 1e-3) for i in layers], "o-",
                     label=kind)
    ax_max.set(title="max |x| per layer (probe texts)", xlabel="layer", ylabel="max |x|",
               yscale="log")
    ax_kurt.set(title="kurtosis per layer (Gaussian = 3)", xlabel="layer", ylabel="kurtosis",
                yscale="log")
    for ax in (ax_max, ax_kurt):
        _readable_log_axis(ax)
        ax.set_xticks(sorted({i for k in order[:max_sites] for i in kinds[k]}))
        ax.grid(alpha=0.3)
    ax_max.legend(fontsize=7)
    return _save(fig, path)


def plot_encoder_heatmap(minilm: Mapping[str, Any], path: str) -> str:
    """|x| of the top channels (rows) at every token (columns) of one text, log colour scale
    with a colour bar; special tokens labelled in red."""
    heat = minilm["heatmap"]
    values = np.maximum(np.asarray(heat["values"], np.float64), 1e-2)
    tokens = heat["tokens"]
    fig, ax = plt.subplots(figsize=(min(18.0, 3.0 + 0.2 * len(tokens)), 4.8))
    image = ax.imshow(values, aspect="auto", cmap="magma",
                      norm=LogNorm(vmin=max(float(values.min()), 1e-2),
                                   vmax=max(float(values.max()), 1e-1)))
    ax.set_yticks(range(len(heat["channels"])), [str(c) for c in heat["channels"]], fontsize=7)
    _label_ticks(ax, tokens, "x", 6 if len(tokens) <= 60 else 5)
    ax.set(ylabel="channel", title=f"|x| at {heat['path']}: top channels x tokens of one text")
    fig.colorbar(image, ax=ax, label="|x| (log scale)")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return _save(fig, path)


def write_part1_figures(workdir: str, minilm: Mapping[str, Any]) -> dict[str, str]:
    """Both PNGs into workdir; returns {title: file name relative to workdir}."""
    figures = {"part 1: per-layer outliers": "part1_per_layer.png",
               "part 1: outlier channels x tokens": "part1_channels_tokens.png"}
    plot_encoder_layers(minilm, os.path.join(workdir, figures["part 1: per-layer outliers"]))
    plot_encoder_heatmap(minilm,
                         os.path.join(workdir, figures["part 1: outlier channels x tokens"]))
    return figures
