"""The row store: each recorded step's values against a shared layout, spilling, to_frame().

Rows are held compactly: batches of steps (see deferred.py), each a matrix of values (8
bytes a row) and the index of its layout (the layer, kind and stat of each row, shared by
all steps that record the same); nothing else grows with the number of steps. With a spill
directory, the rows held are written to ``DIR/part-NNNNNN.parquet`` whenever `spill_rows`
rows are held, `spill_steps` steps were recorded or `spill_seconds` have passed (so a killed
job loses at most the last few seconds); each part is complete on disk as soon as it has its
name, and `to_frame()` (or gradscope.load_run on the folder) reads the parts back. A part
that cannot be written (a full disk) is warned about once, and its rows stay in memory.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gradscope.files import atomic_write, describe
from gradscope.recorder.errors import RecorderError


class SpillError(RecorderError):
    """A spill directory that cannot be used."""


@dataclass(frozen=True)
class Layout:
    """The layer, kind and stat of each row of a step: shared by steps that record the same."""

    layer: np.ndarray
    kind: np.ndarray
    stat: np.ndarray
    blocks: list[tuple[Sequence[str], str, str | tuple[str, ...]]]  # as StepRows.add got them


class StepRows:
    """The rows of a batch of steps as column blocks, turned into a layout and a matrix of
    values (one row per step) at the end.

    Blocks keep the layer lists they were given (callers reuse the same list objects while a
    model records the same things), so a batch whose blocks are those of the previous one
    costs a few identity checks, not a comparison of every row's labels.
    """

    __slots__ = ("blocks", "steps", "values")

    def __init__(self, steps: int = 1) -> None:
        self.steps = steps
        self.blocks: list[tuple[Sequence[str], str, str | tuple[str, ...]]] = []
        self.values: list[np.ndarray] = []

    def add(
        self, layers: Sequence[str], kind: str, stat: str | Sequence[str], values: np.ndarray
    ) -> None:
        """Rows for `layers` (not to be changed afterwards), one stat or one stat each;
        `values`: (steps, layers), or (layers,) where every step has the same."""
        # plain str, not the schema's StrEnum members: frames and Parquet files hold strings
        stats = str(stat) if isinstance(stat, str) else tuple(map(str, stat))
        self.blocks.append((layers, str(kind), stats))
        values = np.asarray(values, dtype=np.float64)
        self.values.append(np.broadcast_to(values, (self.steps, len(layers))))

    @property
    def per_step(self) -> int:
        """How many rows each step of the batch makes."""
        return sum(len(layers) for layers, _, _ in self.blocks)

    def finish(self, previous: Layout | None) -> tuple[Layout, np.ndarray]:
        """The batch's layout (`previous` itself where it is the same) and its values,
        (steps, rows)."""
        values = (
            np.concatenate(self.values, axis=1)
            if self.values
            else np.zeros((self.steps, 0), dtype=np.float64)
        )
        if previous is not None and _same_blocks(previous.blocks, self.blocks):
            return previous, values
        as_array = functools.partial(np.asarray, dtype=object)
        layer = [name for block in self.blocks for name in block[0]]
        kind = [block[1] for block in self.blocks for _ in block[0]]
        stat = [
            name
            for layers, _, stats in self.blocks
            for name in ([stats] * len(layers) if isinstance(stats, str) else stats)
        ]
        return Layout(as_array(layer), as_array(kind), as_array(stat), list(self.blocks)), values


def _same_blocks(
    old: list[tuple[Sequence[str], str, str | tuple[str, ...]]],
    new: list[tuple[Sequence[str], str, str | tuple[str, ...]]],
) -> bool:
    return len(old) == len(new) and all(
        (a[0] is b[0] or list(a[0]) == list(b[0])) and a[1] == b[1] and a[2] == b[2]
        for a, b in zip(old, new, strict=True)
    )


class RowStore:
    """Recorded steps held in memory or spilled to Parquet parts."""

    def __init__(
        self,
        spill_to: Path | None,
        spill_rows: int,
        spill_steps: int = 1000,
        spill_seconds: float = 5.0,
    ) -> None:
        for name, value in (("spill_rows", spill_rows), ("spill_steps", spill_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(spill_seconds, bool) or not isinstance(spill_seconds, int | float):
            raise ValueError(f"spill_seconds must be a number > 0, got {spill_seconds!r}")
        if not spill_seconds > 0:
            raise ValueError(f"spill_seconds must be a number > 0, got {spill_seconds!r}")
        self.spill_to = spill_to
        self.spill_rows = spill_rows  # raised for a while after a part could not be written
        self._spill_rows = spill_rows
        self.spill_steps = spill_steps
        self.spill_seconds = float(spill_seconds)
        self._steps_since = 0
        self._due = time.monotonic() + self.spill_seconds
        self.failed: OSError | None = None  # the last write that failed, until one succeeds
        self.parts: list[Path] = []
        # batches of steps: their indices, their layout's index, their values (steps, rows)
        self._steps: list[tuple[np.ndarray, int, np.ndarray]] = []
        self._layouts: list[Layout] = []
        self.rows_held = 0
        self._last: tuple[int, Layout, np.ndarray] | None = None  # the last step's values

    def last_frame(self) -> pd.DataFrame:
        """The last recorded step alone (held or spilled), as a frame."""
        if self._last is None:
            return empty_frame()
        step, layout, values = self._last
        return pd.DataFrame(
            {
                "step": np.full(len(values), step, dtype=np.int64),
                "layer": layout.layer,
                "kind": layout.kind,
                "stat": layout.stat,
                "value": values,
            }
        )

    @property
    def empty(self) -> bool:
        """Whether no step has been recorded at all."""
        return not self._steps and not self.parts

    def check_spill_dir(self) -> None:
        """Refuses a spill directory that is a file or holds another recording's parts (a
        store that has written parts goes on writing them there)."""
        directory = self.spill_to
        if directory is None or self.parts:
            return
        if directory.exists() and not directory.is_dir():
            raise SpillError(f"spill_to={str(directory)!r} is a file, not a directory")
        if directory.is_dir() and any(directory.glob("part-*.parquet")):
            raise SpillError(
                f"spill_to={str(directory)!r} already holds another recording's parts; "
                "give each recording its own directory"
            )
        try:  # made now, so that a folder that cannot be made fails before training
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpillError(f"spill_to={str(directory)!r} cannot be made: {describe(e)}") from None
        self._due = time.monotonic() + self.spill_seconds

    def step_recorded(self) -> bool:
        """Counts a recorded step; whether the held rows are due to be spilled (by steps or
        by time: one clock read per recorded step, none per row)."""
        self._steps_since += 1
        return self._steps_since >= self.spill_steps or time.monotonic() >= self._due

    def append(self, steps: Sequence[int], rows: StepRows) -> None:
        """Adds a batch of steps' rows (one row of `rows`' values per step)."""
        layout, values = rows.finish(self._layouts[-1] if self._layouts else None)
        if not self._layouts or layout is not self._layouts[-1]:
            self._layouts.append(layout)
        self._steps.append((np.asarray(steps, dtype=np.int64), len(self._layouts) - 1, values))
        self._last = (int(steps[-1]), layout, values[-1])
        self.rows_held += values.size
        if self.rows_held >= self.spill_rows:
            self.spill()

    def spill(self) -> None:
        """Writes the rows held in memory to the next Parquet part and forgets them.

        Never raises an OSError into the training loop: where the part cannot be written,
        the rows stay held (a warning, once), and the next spill tries again.
        """
        self._steps_since = 0
        self._due = time.monotonic() + self.spill_seconds
        if self.spill_to is None or not self.rows_held:
            return
        path = self.spill_to / f"part-{len(self.parts):06d}.parquet"
        frame = self.held_frame()
        try:
            self.spill_to.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p: frame.to_parquet(p, index=False))
        except OSError as e:
            if self.failed is None:
                warnings.warn(
                    f"gradscope: cannot write the spill part {path} ({describe(e)}); the "
                    f"rows stay in memory ({self.rows_held} now) and are written at the "
                    "next spill that succeeds",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.failed = e
            # try again after as many rows again (not at every step) or after spill_seconds
            self.spill_rows = self.rows_held + self._spill_rows
            return
        self.failed = None
        self.spill_rows = self._spill_rows
        self.parts.append(path)
        self._steps.clear()
        self.rows_held = 0

    def held_frame(self) -> pd.DataFrame:
        """The steps held in memory as one long-form frame."""
        steps, layouts = self._steps, self._layouts
        if not steps:
            return empty_frame()
        used = [(layouts[i], len(s)) for s, i, _ in steps]
        return pd.DataFrame(
            {
                "step": np.concatenate([np.repeat(s, v.shape[1]) for s, _, v in steps]),
                "layer": np.concatenate([np.tile(u.layer, n) for u, n in used]),
                "kind": np.concatenate([np.tile(u.kind, n) for u, n in used]),
                "stat": np.concatenate([np.tile(u.stat, n) for u, n in used]),
                "value": np.concatenate([v.ravel() for _, _, v in steps]),
            }
        )

    def to_frame(self) -> pd.DataFrame:
        """All recorded steps, spilled and held, as one long-form frame."""
        held = self.held_frame()
        if not self.parts:
            return held
        spilled = [pd.read_parquet(part) for part in self.parts]
        return pd.concat([*spilled, held] if len(held) else spilled, ignore_index=True)


def empty_frame() -> pd.DataFrame:
    """A frame with the schema's columns and dtypes and no rows."""
    return pd.DataFrame(
        {
            "step": pd.Series(dtype="int64"),
            "layer": pd.Series(dtype=object),
            "kind": pd.Series(dtype=object),
            "stat": pd.Series(dtype=object),
            "value": pd.Series(dtype="float64"),
        }
    )
