"""Keyed permutations and the prefetching, resumable DataIterator."""
import numpy as np
import pytest

from qtransformers.data.indexing import Permutation, process_rows, shuffled_positions
from qtransformers.data.iterators import DataIterator


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 4097])
def test_permutation_is_a_bijection(n: int):
    out = Permutation(n, seed=5, epoch=2)(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))


def test_epochs_and_seeds_reorder():
    a, b = Permutation(1000, 0, 0)(np.arange(1000)), Permutation(1000, 0, 1)(np.arange(1000))
    c = Permutation(1000, 1, 0)(np.arange(1000))
    assert (a != b).mean() > 0.9 and (a != c).mean() > 0.9
    pos = shuffled_positions(np.arange(25), 10, seed=0, shuffle=True)
    assert sorted(pos[:10]) == list(range(10)) and sorted(pos[10:20]) == list(range(10))
    np.testing.assert_array_equal(shuffled_positions(np.arange(12), 10, 0, False),
                                  [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    assert process_rows(12, 2, 3) == range(8, 12)


def _counting_stream(state):
    step = state["step"]
    while step < state.get("stop", 10**9):
        if step == state.get("fail_at"):
            raise RuntimeError(f"boom at {step}")
        yield {"x": np.array([step])}, {**state, "step": step + 1}
        step += 1


@pytest.mark.parametrize("prefetch", [0, 3])
def test_state_is_that_of_the_last_returned_batch(prefetch: int):
    it = DataIterator(_counting_stream, {"step": 0}, prefetch=prefetch)
    assert [int(next(it)["x"][0]) for _ in range(4)] == [0, 1, 2, 3]
    assert it.get_state() == {"step": 4}  # although more batches may be prefetched
    it.set_state({"step": 1})
    assert int(next(it)["x"][0]) == 1
    finite = DataIterator(_counting_stream, {"step": 0, "stop": 3}, prefetch=prefetch, length=3)
    assert len(finite) == 3 and [int(b["x"][0]) for b in finite] == [0, 1, 2]
    with pytest.raises(StopIteration):
        next(finite)
    finite.reset()
    assert [int(b["x"][0]) for b in finite] == [0, 1, 2]


def test_producer_errors_reach_the_caller():
    it = DataIterator(_counting_stream, {"step": 0, "fail_at": 2}, prefetch=2)
    next(it), next(it)
    with pytest.raises(RuntimeError, match="boom at 2"):
        next(it)
    with pytest.raises(TypeError, match="endless"):
        len(it)
