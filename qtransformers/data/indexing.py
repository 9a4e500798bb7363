"""Which example goes where: shuffling by a keyed permutation, per-process rows, per-example RNGs.

Training batch k of a global batch of B rows holds the global example positions k*B .. k*B+B-1;
process p of P owns rows p*B/P .. (p+1)*B/P-1 of it. Position g is example
`perm_e(g mod N)` of the N examples, e = g div N the epoch, perm_e a permutation keyed by
(seed, e): every epoch is a full pass in a fresh order. Everything about row g (the example,
its MLM mask, its crop) is a pure function of (seed, g), so batch k is a pure function of
(seed, k), the union of the P per-process batches is the single-process batch, and resuming
needs only k.

The permutation is a Feistel network on the next power of four above N with cycle walking
(apply again until the value falls below N), vectorised in numpy: O(1) memory for any N
(grain's MapDataset.shuffle does the same job but costs ~2.4 ms per index here).
"""
from __future__ import annotations

import numpy as np

_ROUNDS = 6
_U64 = 0xFFFFFFFFFFFFFFFF


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded bijection of [0, n), evaluated on int arrays: perm(idx) -> idx' (same shape)."""

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        if n < 1:
            raise ValueError(f"cannot permute n={n} examples; the dataset is empty.")
        self.n = int(n)
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.low_mask = np.uint64((1 << self.half) - 1)
        entropy = [int(seed) & _U64, int(epoch), 0x5EED]
        self.keys = np.random.SeedSequence(entropy).generate_state(_ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.low_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.low_mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, idx: np.ndarray | int) -> np.ndarray:
        """Permuted indices (int64) of `idx` (int array, values in [0, n))."""
        x = np.asarray(idx, dtype=np.uint64)
        with np.errstate(over="ignore"):
            x = self._feistel(x)
            while True:
                out = x >= self.n
                if not out.any():
                    return x.astype(np.int64)
                x[out] = self._feistel(x[out])


def shuffled_positions(positions: np.ndarray, n: int, seed: int, shuffle: bool) -> np.ndarray:
    """Example indices of global positions `positions` (int64 (B,)) over epochs of `n` examples."""
    positions = np.asarray(positions, dtype=np.int64)
    within = positions % n
    if not shuffle:
        return within
    epochs = positions // n
    out = np.empty_like(within)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = Permutation(n, seed, int(epoch))(within[sel])
    return out


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> range:
    """Rows of the global batch that process `process_index` of `process_count` owns."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} / process_count={process_count}: need "
                         "process_count >= 1 and 0 <= process_index < process_count.")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not a positive multiple of "
                         f"process_count={process_count}; make it divisible.")
    per = global_batch_size // process_count
    return range(process_index * per, (process_index + 1) * per)


def shard_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Contiguous [start, end) of n items owned by a process (sizes differ by at most one)."""
    return n * process_index // process_count, n * (process_index + 1) // process_count


def example_rng(seed: int, tag: int, index: int) -> np.random.Generator:
    """The random generator of example `index` for purpose `tag` (a pure function of the three)."""
    return np.random.default_rng([int(seed) & _U64, int(tag), int(index)])


# RNG purposes (tags) so that two uses of the same example never share random numbers.
TAG_MLM, TAG_IMAGE, TAG_MIX = 1, 2, 3
