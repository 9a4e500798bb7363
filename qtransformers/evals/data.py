"""Where evaluators get their batches: one `EvalData` per caller, the same batches for all.

An evaluator asks for `eval_batches(num_batches, batch_size)` (an ordered, fresh evaluation
split: the same rows every time) and `calibration_batches(ptq_seed, num_batches, batch_size)`
(PTQ calibration rows drawn by the seed). The calibration stream of PTQ seed s is the training
iterator seeded by `calibration_seed(s)` in every path (trainer, `qtransformers evaluate`,
`reproduce`), so a PTQ number is reproducible from a checkpoint.

Implementations: `DataConfigEvalData` (a data-layer config: what a trainer workdir records),
`RandomEvalData` (random tokens / images for smoke tests); the trainer subclasses the first to
hand out its mesh-sharded, padded eval batches.
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping

import numpy as np

from qtransformers.models.tasks import Task

Batch = Mapping[str, Any]
# Calibration rows of PTQ seed s come from the training stream seeded 10_000 + s: other rows than
# the first training batches of a run seeded s (train.seed / data.seed are small integers).
CALIBRATION_SEED_OFFSET = 10_000


def calibration_seed(ptq_seed: int) -> int:
    """The data seed of PTQ seed `ptq_seed`'s calibration batches (every path uses this)."""
    return CALIBRATION_SEED_OFFSET + int(ptq_seed)


class EvalData:
    """Batches for evaluators. Subclass and implement `_eval_batches` / `calibration_batches`.

    Attributes:
      task: the model's Task (valid rows of padded batches, random batches).
      batch_size: the default rows per eval batch (an evaluator's batch_size=0 takes it).
    """

    def __init__(self, task: Task, batch_size: int):
        self.task, self.batch_size = task, int(batch_size)
        self._cache: dict[tuple[int, int], list[Batch]] = {}

    def eval_batches(self, num_batches: int, batch_size: int = 0) -> list[Batch]:
        """The first `num_batches` (0 = all) batches of `batch_size` (0 = the default) rows of
        the evaluation split, in order. Finite requests are cached: every evaluator of a round
        sees the same arrays."""
        key = (int(num_batches), int(batch_size or self.batch_size))
        if key in self._cache:
            return self._cache[key]
        batches = list(self._eval_batches(*key))
        if not batches:
            raise ValueError("the evaluation data gave zero batches; check the eval split "
                             "(data.eval_split / eval_path) or the evaluator's num_batches")
        if key[0]:
            self._cache[key] = batches
        return batches

    def _eval_batches(self, num_batches: int, batch_size: int) -> Any:
        raise NotImplementedError

    def calibration_batches(self, ptq_seed: int, num_batches: int,
                            batch_size: int) -> list[Batch]:
        """`num_batches` calibration batches of `batch_size` rows for PTQ seed `ptq_seed`."""
        raise NotImplementedError


class DataConfigEvalData(EvalData):
    """Batches from a data-layer config (qtransformers.data): the eval iterator for evaluation,
    the training iterator seeded by calibration_seed(s) for calibration.

    Args:
      data_cfg: the data section (ml_collections.ConfigDict) of a run, or one made by
        Task.configure_data.
      workdir: the run's workdir (cached vocabularies, relative paths), or None.
      tokenizer: a built tokenizer to reuse (text), or None (the data layer builds it).
    """

    def __init__(self, task: Task, data_cfg: Any, batch_size: int, workdir: str | None = None,
                 tokenizer: Any = None):
        super().__init__(task, batch_size)
        self.data_cfg, self.workdir, self.tokenizer = data_cfg, workdir, tokenizer

    def _kwargs(self) -> dict[str, Any]:
        return {} if self.tokenizer is None else {"tokenizer": self.tokenizer}

    def _eval_batches(self, num_batches: int, batch_size: int) -> Any:
        from qtransformers import data as data_lib
        iterator = data_lib.make_eval_iterator(self.data_cfg, batch_size=batch_size,
                                               workdir=self.workdir, **self._kwargs())
        try:
            yield from itertools.islice(iter(iterator), num_batches or None)
        finally:
            if hasattr(iterator, "close"):
                iterator.close()

    def calibration_batches(self, ptq_seed: int, num_batches: int,
                            batch_size: int) -> list[Batch]:
        from qtransformers import data as data_lib
        iterator = data_lib.make_train_iterator(
            self.data_cfg, global_batch_size=batch_size, seed=calibration_seed(ptq_seed),
            workdir=self.workdir, **self._kwargs())
        try:
            return [next(iterator) for _ in range(num_batches)]
        finally:
            if hasattr(iterator, "close"):
                iterator.close()


class RandomEvalData(EvalData):
    """Random batches of the task (Task.random_batches): evaluation seed 10**6, calibration
    seed calibration_seed(s)."""

    EVAL_SEED = 10**6

    def __init__(self, task: Task, model_cfg: Any, batch_size: int, seq_len: int):
        super().__init__(task, batch_size)
        self.model_cfg, self.seq_len = model_cfg, int(seq_len)

    def _eval_batches(self, num_batches: int, batch_size: int) -> list[dict[str, np.ndarray]]:
        return self.task.random_batches(self.model_cfg, num_batches or 8, batch_size,
                                        self.seq_len, self.EVAL_SEED)

    def calibration_batches(self, ptq_seed: int, num_batches: int,
                            batch_size: int) -> list[dict[str, np.ndarray]]:
        return self.task.random_batches(self.model_cfg, num_batches, batch_size, self.seq_len,
                                        calibration_seed(ptq_seed))
