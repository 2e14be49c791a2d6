"""Merging one step's statistics over ranks: one packed all-reduce per reduction.

Every statistic is held in additive form (sums, counts) or as an extreme (min, max), so the
merge is generic: a step registers its host arrays with their reduction, `run()` concatenates
the arrays of each reduction and all-reduces each concatenation once (at most three
collectives a step, whatever the model), and each array is read back by its handle.
"""

from __future__ import annotations

import numpy as np

from gradscope.recorder import distributed
from gradscope.recorder.errors import RecorderError

REDUCTIONS = ("sum", "min", "max")


class MergeError(RecorderError):
    """Ranks recorded different things in one step, so their statistics cannot be merged."""


class StepMerge:
    """The arrays of one step, merged over ranks when `sync` (else returned as they are)."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self._arrays: list[tuple[np.ndarray, str]] = []
        self._merged: list[np.ndarray] = []
        self._counts: list[int] = []  # layer counts every rank must agree on

    def add(self, values: np.ndarray, op: str) -> int:
        """Registers an array to be merged with `op` ("sum", "min" or "max"); its handle."""
        assert op in REDUCTIONS, op
        self._arrays.append((np.asarray(values, dtype=np.float64), op))
        return len(self._arrays) - 1

    def expect_same(self, count: int) -> None:
        """Registers a count (e.g. of layers) that must be equal on every rank."""
        self._counts.append(count)

    def run(self) -> None:
        """All-reduces the registered arrays, one collective per reduction used."""
        arrays = [values for values, _ in self._arrays]
        if not self.sync:
            self._merged = arrays
            return
        merged = list(arrays)
        counts = np.array(self._counts, dtype=np.float64)
        packs: dict[str, list[int]] = {op: [] for op in REDUCTIONS}
        for i, (_, op) in enumerate(self._arrays):
            packs[op].append(i)
        extra = {"min": counts, "max": counts}  # equal counts: their min is their max
        results = {}
        for op in REDUCTIONS:
            parts = [arrays[i].ravel() for i in packs[op]]
            tail = extra.get(op, np.zeros(0))
            if not parts and not len(tail):
                continue
            flat = distributed.all_reduce_array(np.concatenate([*parts, tail]), op)
            start = 0
            for i in packs[op]:
                size = arrays[i].size
                merged[i] = flat[start : start + size].reshape(arrays[i].shape)
                start += size
            results[op] = flat[start:]
        if len(counts) and not np.array_equal(results["min"], results["max"]):
            raise MergeError("ranks recorded different modules in one step; cannot merge")
        self._merged = merged

    def get(self, handle: int) -> np.ndarray:
        """The merged array registered under `handle` (after `run()`)."""
        return self._merged[handle]
