"""The per-call statistics, declared once: each field of a module output's row and of an output
gradient's row, with the reduction that merges it over calls, micro-batches and ranks.

Every implementation fills these rows in this order (the C kernels, torch ops eager or fused,
compiled graphs); the reduction, the merge over ranks and the derived statistics read them by
name. Adding a statistic: a field here, its value in each implementation (backends.py,
torch_ops.py, fused.py, graph_ops.py, native/kernels.c) and, where the frame shows something
derived from it, derive.py and schema.Stat.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Reduction(StrEnum):
    """How values of one field merge: over calls of a module, micro-batches and ranks."""

    SUM = "sum"
    MIN = "min"
    MAX = "max"

    @property
    def ufunc(self) -> np.ufunc:
        """The numpy reduction (extremes ignore NaN, as within a call)."""
        return {"sum": np.add, "min": np.fmin, "max": np.fmax}[self.value]

    @property
    def identity(self) -> float:
        """The value of no call."""
        return {"sum": 0.0, "min": np.inf, "max": -np.inf}[self.value]


@dataclass(frozen=True)
class Field:
    """One per-call value. `power`: how it scales with the gradient it is taken of (a sum of
    squares 2, a sum of norms 1, a count 0), for unscaling (GradScaler) and averaging over
    ranks; 0 for outputs."""

    name: str
    reduction: Reduction
    doc: str
    power: int = 0


class Fields:
    """An ordered row of fields: a table of calls has one column per field."""

    def __init__(self, *fields: Field) -> None:
        self.fields = fields
        self.names = tuple(f.name for f in fields)
        self._index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.fields)

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def __add__(self, other: Fields) -> Fields:
        return Fields(*self.fields, *other.fields)

    def index(self, name: str) -> int:
        return self._index[name]

    def columns(self, table: np.ndarray) -> dict[str, np.ndarray]:
        """A table's (..., fields) values by field name (views, not copies)."""
        return {name: table[..., i] for i, name in enumerate(self.names)}

    def empty_row(self) -> np.ndarray:
        """The row of no call: each field's reduction's identity."""
        return np.array([f.reduction.identity for f in self.fields])


SUM, MIN, MAX = Reduction.SUM, Reduction.MIN, Reduction.MAX

# a module output, one row per call
OUTPUT = Fields(
    Field("sum", SUM, "sum of the values"),
    Field("sumsq", SUM, "sum of their squares (float64: exact at subnormal values)"),
    Field("min", MIN, "smallest value, ignoring NaN"),
    Field("max", MAX, "largest value, ignoring NaN"),
    Field("nonzero", SUM, "values that are not 0 (NaN is not 0)"),
    Field("nonfinite", SUM, "inf and NaN values"),
    Field(
        "dead_units",
        MIN,
        "units (units.py) that are 0 at every sample and position; a unit is dead over "
        "several calls only where dead in each, so the smallest count: exact when the calls' "
        "dead units are nested, else an upper bound",
    ),
    Field("units", MAX, "units of the output (units.py)"),
)

# an output gradient, one row per call (samples along the first dimension)
GRAD = Fields(
    Field("sumsq", SUM, "sum of squares of the gradient", power=2),
    Field("sample_norm_sum", SUM, "sum over samples of each sample's norm", power=1),
    Field("nonfinite_samples", SUM, "samples whose gradient holds inf or NaN"),
)

# inside a compiled graph an output's row also carries what the eager path keeps beside it
GRAPH_OUTPUT = OUTPUT + Fields(
    Field("count", SUM, "number of values"),
    Field("saturated", SUM, "values in the saturation band (bounded activations)"),
)
GRAPH_GRAD = GRAD + Fields(Field("samples", SUM, "number of samples"))


def by_reduction(fields: Fields) -> dict[Reduction, list[str]]:
    """The fields' names grouped by their reduction (one merge over ranks per group)."""
    groups: dict[Reduction, list[str]] = {}
    for f in fields:
        groups.setdefault(f.reduction, []).append(f.name)
    return groups
