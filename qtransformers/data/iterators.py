"""Resumable batch iterators: a prefetching `DataIterator` and the step-indexed batch builder.

`DataIterator` wraps a `stream_fn(state) -> iterator of (batch, state after that batch)`. It
prefetches in one background thread, and `get_state()` returns the state after the last batch it
handed out (not after the last one prefetched), so a checkpoint saved between steps resumes with
exactly the next batch.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from qtransformers.data.indexing import process_rows, shuffled_positions

Batch = dict[str, np.ndarray]
StreamFn = Callable[[dict[str, Any]], Iterator[tuple[Batch, dict[str, Any]]]]
_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(gen: Iterator[Any], q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in gen:
            if not _put(q, item, stop):
                return
        _put(q, _END, stop)
    except BaseException as e:  # handed to the consumer, re-raised there
        _put(q, _Failure(e), stop)


class DataIterator:
    """Iterator of per-process batches (dicts of numpy arrays) with get_state / set_state.

    The state is a small JSON-serialisable dict; `set_state` on a fresh iterator built with the
    same config, batch size, seed and process layout continues with exactly the batches the
    original iterator would have produced.
    """

    def __init__(self, stream_fn: StreamFn, state: dict[str, Any], *, prefetch: int = 2,
                 length: int | None = None,
                 check_state: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._stream_fn, self._prefetch, self._length = stream_fn, prefetch, length
        self._check_state = check_state
        self._initial, self._state = dict(state), dict(state)
        self._gen: Iterator[Any] | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __iter__(self) -> DataIterator:
        return self

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError("a training iterator is endless; only evaluation iterators have len().")
        return self._length

    def _start(self) -> None:
        self._gen = self._stream_fn(dict(self._state))
        if self._prefetch > 0:
            self._queue, self._stop = queue.Queue(maxsize=self._prefetch), threading.Event()
            self._thread = threading.Thread(target=_produce, args=(self._gen, self._queue,
                                                                   self._stop), daemon=True)
            self._thread.start()

    def __next__(self) -> Batch:
        if self._gen is None:
            self._start()
        if self._queue is None:
            batch, state = next(self._gen)
        else:
            item = self._queue.get()
            if item is _END:
                self._queue.put(_END)  # stay exhausted
                raise StopIteration
            if isinstance(item, _Failure):
                raise item.error
            batch, state = item
        self._state = state
        return batch

    def get_state(self) -> dict[str, Any]:
        """The position after the last batch returned (JSON-serialisable)."""
        return dict(self._state)

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from get_state); prefetched batches are discarded."""
        state = dict(state)
        if self._check_state is not None:
            self._check_state(state)
        self.close()
        self._state = state

    def reset(self) -> None:
        """Back to the first batch (e.g. to run an evaluation pass again)."""
        self.set_state(self._initial)

    def close(self) -> None:
        """Stop the prefetch thread (the iterator restarts lazily on the next `next`)."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
        self._gen = self._queue = self._stop = self._thread = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def state_checker(fixed: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """A set_state check: the state must carry these exact settings and a step >= 0."""
    def check(state: dict[str, Any]) -> None:
        for key, value in fixed.items():
            if state.get(key) != value:
                raise ValueError(f"data iterator state has {key}={state.get(key)!r} but this "
                                 f"iterator was built with {key}={value!r}; rebuild it with the "
                                 "same settings as the run that saved the state.")
        if int(state.get("step", -1)) < 0:
            raise ValueError(f"data iterator state {state!r} has no valid 'step'.")
    return check


def stack(examples: list[Batch]) -> Batch:
    """Stack per-example dicts into a batch dict (leading axis B)."""
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


class IndexedBatches:
    """Batch k = a pure function of (seed, k, process rows); see indexing.py.

    example_fn(source_index, global_position) -> dict of arrays for one row;
    pad_fn() -> a padding row (weights 0) for positions past the end of a finite pass;
    post_fn(batch, first_global_position) -> batch, applied to whole batches (Mixup / CutMix).
    Training (finite=False) runs forever over shuffled epochs; evaluation (finite=True) visits
    positions 0 .. n-1 in order once, in ceil(n / global_batch_size) batches on every process.
    """

    def __init__(self, n: int, example_fn: Callable[[int, int], Batch], *, global_batch_size: int,
                 process_index: int, process_count: int, seed: int, shuffle: bool, finite: bool,
                 num_workers: int = 0, pad_fn: Callable[[], Batch] | None = None,
                 post_fn: Callable[[Batch, int], Batch] | None = None) -> None:
        if n < 1:
            raise ValueError("the dataset has no examples (is the corpus shorter than one row of "
                             "data.seq_len tokens?); lower data.seq_len or add data.")
        self.rows = process_rows(global_batch_size, process_index, process_count)
        self.n, self.example_fn, self.global_batch_size = n, example_fn, global_batch_size
        self.seed, self.shuffle, self.finite = seed, shuffle, finite
        self.pad_fn, self.post_fn = pad_fn, post_fn
        self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 0
                      else None)

    @property
    def num_batches(self) -> int | None:
        """Batches in one finite pass (None for endless training)."""
        return -(-self.n // self.global_batch_size) if self.finite else None

    def batch(self, step: int) -> Batch:
        """The per-process batch of global step `step`."""
        positions = step * self.global_batch_size + np.arange(self.rows.start, self.rows.stop)
        if self.finite:
            sources = positions
        else:
            sources = shuffled_positions(positions, self.n, self.seed, self.shuffle)

        def one(i: int) -> Batch:
            if self.finite and positions[i] >= self.n:
                return self.pad_fn()
            return self.example_fn(int(sources[i]), int(positions[i]))

        indices = range(len(positions))
        examples = list(self._pool.map(one, indices)) if self._pool else [one(i) for i in indices]
        out = stack(examples)
        return self.post_fn(out, int(positions[0])) if self.post_fn else out

    def stream(self, state: dict[str, Any]) -> Iterator[tuple[Batch, dict[str, Any]]]:
        """(batch, state after it) from state['step'] on."""
        step = int(state["step"])
        while self.num_batches is None or step < self.num_batches:
            batch = self.batch(step)
            step += 1
            yield batch, {**state, "step": step}
