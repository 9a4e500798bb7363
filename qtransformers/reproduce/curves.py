"""Emergence curves of any trainer runs side by side (the reproduce report's training-curve
figure, for runs trained with `qtransformers train`):

    python3 -m qtransformers.reproduce.curves RUN_DIR[=LABEL] ... --out curves.png [--table]

Reads each run's periodic outlier evaluations (train.outlier_eval_every) from metrics.jsonl and
plots avg kurtosis, max inf-norm, max |x| at the first token vs elsewhere and the attention share
on the first token over training steps. --table also prints them as a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from qtransformers.reproduce import plots
from qtransformers.reproduce.runner import HISTORY_COLUMNS as COLUMNS, training_history


def load_runs(specs: Sequence[str]) -> dict[str, dict]:
    """{label: {'history': [...]}} for 'RUN_DIR' or 'RUN_DIR=LABEL' specs."""
    runs = {}
    for spec in specs:
        path, _, label = spec.partition("=")
        if not os.path.isfile(os.path.join(path, "metrics.jsonl")):
            raise ValueError(f"{path!r} has no metrics.jsonl; give a `qtransformers train` "
                             "workdir.")
        history = training_history(path)
        if not history:
            raise ValueError(f"{path!r} has no outlier evaluations; train with "
                             "--config.train.outlier_eval_every=N.")
        runs[label or os.path.basename(os.path.normpath(path))] = {"history": history}
    return runs


def markdown_table(runs: dict[str, dict]) -> str:
    """One row per (run, evaluated step)."""
    lines = ["| run | step | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for label, run in runs.items():
        for row in run["history"]:
            cells = [f"{row[c]:.3g}" if c in row else "—" for c in COLUMNS]
            lines.append(f"| {label} | {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry (argv without the program name)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--table", action="store_true", help="print a Markdown table too")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except ValueError as err:
        print(f"curves: error: {err}", file=sys.stderr)
        return 2
    plots.plot_training_curves(runs, args.out)
    if args.table:
        print(markdown_table(runs))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
