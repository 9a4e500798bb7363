"""The block-output outlier view now lives in qtransformers.evals.block_outliers (an evaluator
the trainer runs); these names stay for existing imports."""
from qtransformers.evals.block_outliers import (OutlierEvalFn, attention_probabilities,  # noqa: F401
                                                block_outputs, default_outlier_eval_fn,
                                                summarize_outliers)
