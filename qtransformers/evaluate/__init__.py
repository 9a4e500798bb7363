"""Evaluation: outlier metrics (paper.md §5), PTQ reports and the `qtransformers evaluate` CLI."""
from qtransformers.evaluate.outliers import (DEFINITION, TRACKED, OutlierAccumulator,
                                             TrackedSites, collect_outlier_metrics,
                                             outlier_eval_fn, per_layer_table, per_sample_outliers,
                                             tracked_sites)
from qtransformers.evaluate.report import (format_table, per_layer_rows, ptq_row, to_jsonable,
                                           write_json)

__all__ = [
    "DEFINITION", "OutlierAccumulator", "TRACKED", "TrackedSites", "collect_outlier_metrics",
    "format_table", "outlier_eval_fn", "per_layer_rows", "per_layer_table",
    "per_sample_outliers", "ptq_row", "to_jsonable", "tracked_sites", "write_json",
]
