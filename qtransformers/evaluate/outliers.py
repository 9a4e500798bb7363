"""The paper's outlier metrics now live in qtransformers.evals.outliers (shared by the trainer,
`qtransformers evaluate` and `reproduce`); these names stay for existing imports."""
from qtransformers.evals.outliers import (DEFINITION, TRACKED, OutlierAccumulator,  # noqa: F401
                                          TrackedSites, collect_outlier_metrics,
                                          outlier_eval_fn, per_layer_table, per_sample_outliers,
                                          tracked_sites)
