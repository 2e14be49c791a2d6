"""The per-call rows as computed inside compiled graphs (torch.compile traces them): one
output's fields.GRAPH_OUTPUT row, one output gradient's fields.GRAPH_GRAD row, and two rows of
one module folded by each field's reduction. Pure torch ops with no host sync, so that a
compiled graph fuses them into one pass."""

from __future__ import annotations

import math
from itertools import groupby

import torch

from gradscope.recorder.stats.fields import GRAPH_OUTPUT, Reduction
from gradscope.recorder.stats.torch_ops import dead_units


def output_row(x: torch.Tensor, band: tuple[float, float] | None, axis: int | None) -> torch.Tensor:
    """fields.GRAPH_OUTPUT of one tensor (float64): sums accumulated in float64 (exact at
    subnormal values), extremes and counts in the tensor's own dtype (exact there too);
    extremes ignore NaN. `axis`: the units' dim (units.unit_axis). On a CPU only the sums pay
    for float64 (~3x cheaper than everything in float64)."""
    x = x.detach()
    wide = x.to(torch.float64)
    number = x == x  # not NaN
    if x.numel():
        lo = torch.where(number, x, math.inf).amin().to(torch.float64)
        hi = torch.where(number, x, -math.inf).amax().to(torch.float64)
    else:
        lo, hi = wide.new_full((), math.inf), wide.new_full((), -math.inf)
    if band is not None:
        saturated = (wide - band[0]).abs().ge(band[1]).sum().to(torch.float64)
    else:
        saturated = wide.new_zeros(())
    units = (1 if axis is None else x.shape[axis]) if x.numel() else 0
    values = {
        "sum": wide.sum(),
        "sumsq": (wide * wide).sum(),
        "min": lo,
        "max": hi,
        "nonzero": x.ne(0).sum().to(torch.float64),
        "nonfinite": (x - x).ne(0).sum().to(torch.float64),  # inf - inf and NaN - NaN: NaN
        "dead_units": dead_units(x, axis).to(torch.float64) if x.numel() else wide.new_zeros(()),
        "units": wide.new_full((), units),
        "count": torch.full((), x.numel(), dtype=torch.float64, device=x.device),
        "saturated": saturated,
    }
    return torch.stack([values[name] for name in GRAPH_OUTPUT.names])


# runs of consecutive fields with one reduction: (start, end, reduction)
_RUNS = []
_start = 0
for _reduction, _group in groupby(f.reduction for f in GRAPH_OUTPUT):
    _n = len(list(_group))
    _RUNS.append((_start, _start + _n, _reduction))
    _start += _n


def fold_rows(before: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Two fields.GRAPH_OUTPUT rows of one module merged, each field by its reduction."""
    parts = []
    for start, end, reduction in _RUNS:
        a, b = before[start:end], row[start:end]
        if reduction is Reduction.SUM:
            parts.append(a + b)
        elif reduction is Reduction.MIN:
            parts.append(torch.minimum(a, b))
        else:
            parts.append(torch.maximum(a, b))
    return torch.cat(parts)


def grad_row(g: torch.Tensor) -> torch.Tensor:
    """fields.GRAPH_GRAD of one output gradient (samples along the first dimension), float64."""
    g = g.detach()
    rows = g.reshape(1, 1) if g.dim() == 0 else g.reshape(g.shape[0], -1)
    sumsq = (rows.to(torch.float64) ** 2).sum(dim=1)
    norms = sumsq.sqrt()
    return torch.stack(
        [
            sumsq.sum(),
            norms.sum(),
            torch.isfinite(norms).logical_not().sum().to(torch.float64),
            sumsq.new_ones(sumsq.shape).sum(),
        ]
    )
