"""One run's frame pivoted once for the rules: step x layer tables of each statistic, the
per-step series the rules share (total gradient norm, median update ratio and step size),
and helpers over time (the steps where a condition holds, its onset and end).

Pure: a view is built from a frame and never changes; each table is made on first use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gradscope import frame as fr
from gradscope.schema import TOTAL, Kind, Stat


def _wide(frame: pd.DataFrame, kind: Kind, stat: Stat) -> pd.DataFrame:
    """step x layer: the first non-NaN value of each (step, layer), as pivot_table(aggfunc=
    "first") gives it (steps with no value left out), layers in frame order (forward order
    for activations). Filled with numpy: pandas' pivot_table costs 20 ms a table, which the
    online diagnosis pays on every whole-run check."""
    rows = fr.select(frame, kind, stat)
    if rows.empty:
        return pd.DataFrame()
    layers = rows["layer"].to_numpy(dtype=object)
    order = list(dict.fromkeys(layers))
    column = {name: i for i, name in enumerate(order)}
    col = np.fromiter((column[name] for name in layers), dtype=np.int64, count=len(layers))
    steps = rows["step"].to_numpy()
    index = np.unique(steps)
    row = np.searchsorted(index, steps)
    values = rows["value"].to_numpy(dtype=float)
    keep = ~np.isnan(values)
    table = np.full((len(index), len(order)), np.nan)
    cell = (row * len(order) + col)[keep]
    _, first = np.unique(cell, return_index=True)  # each cell's first value
    table.flat[cell[first]] = values[keep][first]
    filled = ~np.isnan(table).all(axis=1)
    return pd.DataFrame(
        table[filled],
        index=pd.Index(index[filled], name="step"),
        columns=pd.Index(order, name="layer"),
    )


@dataclass(frozen=True)
class Span:
    """Where a condition holds over the recorded steps."""

    share: float  # of the steps looked at
    first: int | None  # onset: the first step it holds
    last: int | None  # end: the last step it holds
    steps: int  # how many steps it holds on


def span(holds: pd.Series) -> Span:
    """Share, onset and end of a boolean series indexed by step."""
    hits = holds.index[holds.to_numpy(dtype=bool)]
    if len(holds) == 0 or len(hits) == 0:
        return Span(0.0, None, None, 0)
    return Span(len(hits) / len(holds), int(hits[0]), int(hits[-1]), len(hits))


def module_of(param: str) -> str:
    """The module fqn of a parameter fqn ("blocks.0.fc.weight" -> "blocks.0.fc"); a
    parameter of the root module ("pos") names itself."""
    return param.rsplit(".", 1)[0] if "." in param else param


class RunView:
    """The tables the rules read, each pivoted once from the long-form frame."""

    def __init__(self, frame: pd.DataFrame, model: dict[str, Any] | None = None) -> None:
        self.frame = frame
        # the recorder's model summary (Recorder.model_summary), where the caller has it
        self.model: dict[str, Any] = model or {}
        self.steps = np.sort(frame["step"].unique()) if len(frame) else np.array([], dtype=int)

    def table(self, kind: Kind, stat: Stat) -> pd.DataFrame:
        return self._table(kind, stat)

    @functools.lru_cache(maxsize=64)  # noqa: B019 (a view lives as long as one diagnosis)
    def _table(self, kind: Kind, stat: Stat) -> pd.DataFrame:
        return _wide(self.frame, kind, stat)

    @functools.cached_property
    def matrices(self) -> list[str]:
        """Weight matrices (ndim >= 2) in parameter order."""
        return fr.weight_matrices(self.frame)

    @functools.cached_property
    def stream(self) -> set[str]:
        return set(fr.stream_layers(self.frame))

    @functools.cached_property
    def grad(self) -> pd.DataFrame:
        """Parameter gradient norms, step x parameter (the total `*` left out)."""
        t = self.table(Kind.PARAM_GRAD, Stat.NORM)
        return t.drop(columns=[TOTAL], errors="ignore")

    @functools.cached_property
    def total_grad(self) -> pd.Series:
        t = self.table(Kind.PARAM_GRAD, Stat.NORM)
        if TOTAL in t.columns:
            return t[TOTAL]
        return np.sqrt((self.grad**2).sum(axis=1, min_count=1))

    @functools.cached_property
    def loss(self) -> pd.Series:
        t = self.table(Kind.SCALAR, Stat.LOSS)
        return t[TOTAL] if TOTAL in t.columns else pd.Series(dtype=float)

    @functools.cached_property
    def first_nonfinite(self) -> int | None:
        """The first step with an inf/NaN anywhere (outputs, gradients, the loss)."""
        found: list[int] = []
        for kind in (Kind.ACTIVATION, Kind.ACTIVATION_GRAD, Kind.PARAM_GRAD):
            t = self.table(kind, Stat.NONFINITE)
            if not t.empty:
                bad = (t.fillna(0) > 0).any(axis=1)
                if bad.any():
                    found.append(int(bad.idxmax()))
        loss = self.loss
        if len(loss):
            bad = ~np.isfinite(loss.to_numpy(dtype=float))
            if bad.any():
                found.append(int(loss.index[int(np.argmax(bad))]))
        origins = fr.select(self.frame, Kind.NONFINITE_ORIGIN)
        if len(origins):
            found.append(int(origins["step"].min()))
        return min(found) if found else None

    def finite_steps(self, table: pd.DataFrame) -> pd.DataFrame:
        """The rows of `table` before the run went non-finite (judged on what was sane)."""
        stop = self.first_nonfinite
        return table if stop is None else table[table.index < stop]

    def _matrix_median(self, stat: Stat) -> pd.Series:
        t = self.table(Kind.UPDATE, stat)
        cols = [c for c in self.matrices if c in t.columns] or list(t.columns)
        if t.empty or not cols:
            return pd.Series(dtype=float)
        values = t[cols].where(np.isfinite(t[cols]))
        return values.median(axis=1)

    @functools.cached_property
    def update_ratio(self) -> pd.Series:
        """Median over weight matrices of update norm / weight norm, per step."""
        return self._matrix_median(Stat.RATIO)

    @functools.cached_property
    def step_size(self) -> pd.Series:
        """Median over weight matrices of update norm / gradient norm (the effective
        learning rate), per step."""
        return self._matrix_median(Stat.STEP_SIZE)


def trailing_median(series: pd.Series, window: int, min_history: int) -> pd.Series:
    """Each step's baseline: the median of up to `window` earlier finite values (NaN before
    `min_history` of them)."""
    finite = series.where(np.isfinite(series))
    return finite.shift(1).rolling(window, min_periods=min_history).median()


def ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return math.inf if (not math.isfinite(a) or (a > 0 and b <= 0)) else math.nan
    return a / b
