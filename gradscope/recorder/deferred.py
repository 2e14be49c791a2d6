"""Closed steps held as their host tables until their rows are needed, then reduced together;
before that, steps whose statistics are still on their way to the host.

A closed step's one transfer (capture.py) is read when it has arrived: at a later step's
close, or when rows are asked for (`settled()`); nothing waits for the device while steps
run, unless more than MAX_IN_FLIGHT steps are in flight. On the CPU a step's values are there
at once, so it is read at its own close. What reads the values early (the non-finite origin,
the online diagnosis) therefore sees a step on a device one step or more late.

A recorded step's statistics reach the host when it closes (capture.py); turning them into
rows (reduce.py) is host bookkeeping that does not need to happen then. Consecutive steps
that made the same calls (the same `step_key`) are held as they are and reduced in one
batch, vectorized over the steps, when rows are asked for (to_frame, save, the last step),
when the calls change, when `MAX_HELD` steps are held, or when the rows would reach the
store's spill threshold. The first step of each new key is reduced at once, so that its
row count is known (rows_held, spilling). Steps merged over ranks, steps with a non-finite
value and recorders with an online diagnosis are reduced as they close.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable

import numpy as np

from gradscope.recorder import distributed
from gradscope.recorder.capture import PendingStep, Tables
from gradscope.recorder.merge import StepMerge
from gradscope.recorder.reduce import ParamLayout, Reducer, step_key
from gradscope.recorder.rows import RowStore

MAX_HELD = 256  # steps held unreduced at most (a few kB each)
MAX_IN_FLIGHT = 2  # steps whose transfer may be unread (one host buffer each)

Finish = Callable[[int, Tables, "np.ndarray | None"], None]


class DeferredRows:
    """The row store, fed batches of steps with one key; `settled()` reduces what is held."""

    def __init__(self, store: RowStore) -> None:
        self.store = store
        self.reducer = Reducer({})
        self.params = ParamLayout([], np.zeros(0), np.zeros(0, dtype=bool))
        self.sync = False
        self.keep = True  # False on ranks other than 0 of a merged recording: no rows kept
        self._key: Hashable = None  # the key of the last step reduced or held
        self._rows_per_step = 0  # rows a step of that key makes
        self._held: list[Tables] = []
        self._steps: list[int] = []
        self._scales: list[np.ndarray] = []
        self._origins: dict[str, str] = {}
        self._in_flight: deque[tuple[int, PendingStep, Finish]] = deque()

    def reset(self, reducer: Reducer, params: ParamLayout, sync: bool) -> None:
        """Rows from now on come from a new attach (its model's layers and parameters)."""
        self.drain()
        self.flush()
        self.reducer, self.params, self.sync = reducer, params, sync
        self.keep = not sync or distributed.rank() == 0
        self._key = None

    def pend(self, step: int, pending: PendingStep, finish: Finish) -> None:
        """A closed step whose transfer is under way: `finish(step, tables, scales)` is
        called with its tables once they are read (in step order)."""
        self._in_flight.append((step, pending, finish))
        self.drain(wait=len(self._in_flight) > MAX_IN_FLIGHT)

    def drain(self, wait: bool = True) -> None:
        """Reads the steps in flight whose values have arrived (all of them with `wait`, the
        oldest at least where more than MAX_IN_FLIGHT are in flight)."""
        while self._in_flight:
            step, pending, finish = self._in_flight[0]
            if not (wait or pending.ready() or len(self._in_flight) > MAX_IN_FLIGHT):
                return
            self._in_flight.popleft()
            tables, scales = pending.finish()
            finish(step, tables, scales)

    @property
    def rows_held(self) -> int:
        """Rows held in memory (not yet spilled), counting steps not reduced yet."""
        return self.store.rows_held + len(self._held) * self._rows_per_step

    @property
    def empty(self) -> bool:
        return self.store.empty and not self._held and not self._in_flight

    def settled(self) -> RowStore:
        """The store with every closed step's rows in it."""
        self.drain()
        self.flush()
        return self.store

    def add(
        self,
        step: int,
        tables: Tables,
        scales: np.ndarray | None,
        origins: dict[str, str],
        now: bool = False,
    ) -> None:
        """A closed step's tables; reduced at once with `now` (or for a step that may not
        wait: merged over ranks, non-finite, or the first of its key), else held."""
        key = step_key(tables, scales is not None, origins)
        if self._held and key != self._key:
            self.flush()
        if scales is not None:
            self._scales.append(scales)
        if self._held:  # the same calls as the first step held: keep only the numbers
            tables.hold(self._held[0])
        self._held.append(tables)
        self._steps.append(step)
        self._origins = origins
        first = key != self._key
        self._key = key
        if now or first or self.sync or origins or len(self._held) >= MAX_HELD:
            self.flush()
            return
        if self.store.spill_to is not None and self.rows_held >= self.store.spill_rows:
            self.flush()

    def flush(self) -> None:
        """Reduces the steps held into rows, in one batch."""
        if not self._held:
            return
        world = distributed.world_size() if self.sync else 1
        rows = self.reducer.reduce(
            self._held,
            self._scales or None,
            self._origins,
            self.params,
            StepMerge(self.sync),
            world,
        )
        self._rows_per_step = rows.per_step
        if self.keep:
            self.store.append(self._steps, rows)
        self._held, self._steps, self._scales = [], [], []
