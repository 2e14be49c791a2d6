"""The per-call statistics computed with torch ops (any device, any float dtype), in additive
form: they add across calls, micro-batches and ranks (fields.py), and derive.py turns them
into norms, means and fractions. Module outputs and output gradients: sums of squares are
float64 norms squared, exact down to float32 subnormals (first-layer gradients at depth 100
are about 1e-39), a few ops a call (activation_moments, sample_norms); the work buffer is
reused (`Scratch`), so recorded steps allocate little. Parameters (flat.py): torch's cascade
sums of the squares over flat size groups (~1e-7 relative at any length); where a square may
have underflowed or overflowed, `needs_exact` flags the sum and the host takes the float64
norm computed beside it.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

# what activation_moments computes on the device for one output, in this order, as one
# float64 value each once transferred: the sum (in the output's float dtype), the float64 norm
# (its square is the sum of squares), the non-zero and non-finite counts, the units with a
# non-zero value, and the largest value and the smallest one negated (both ignoring NaN)
MOMENTS = ("sum", "norm", "nonzero", "nonfinite", "alive_units", "max", "neg_min")
# the rows of the work buffer that one elementwise op fills from an output x: x itself, x * 0
# (NaN exactly where x is inf or NaN, else 0: its non-zeros are the non-finite count) and -x
# (whose largest value is minus x's smallest)
_ROW_FACTORS = (1.0, 0.0, -1.0)

SATURATION_MARGIN = 0.01  # "saturated": within 1% of a bound's magnitude of that bound
# (parameters) a float32 sum of n squares is exact to ~1e-7 relative unless some squares left
# the normal range: each underflowed square loses at most 2**-149, so sums above n * 2**-126
# lose at most 2**-23 relative; below that (or inf/NaN) they are redone in float64
_TINY_SQUARE = 2.0**-126


class Scratch:
    """Reusable flat buffers, one per (dtype, device, thread), grown to the largest request."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}
        self._views: dict[tuple[Any, torch.dtype, torch.device, int], torch.Tensor] = {}
        self._factors: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def flat(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device, threading.get_ident())
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
            self._views.clear()  # they would keep the old buffer alive
        return buffer[:numel]

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """A buffer of x's shape and dtype (a view of the flat one, cached per shape)."""
        key = (x.shape, x.dtype, x.device, threading.get_ident())
        view = self._views.get(key)
        if view is None:
            view = self.flat(x.numel(), x.dtype, x.device).view(x.shape)
            self._views[key] = view
        return view

    def rows(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A (len(_ROW_FACTORS), *x.shape) buffer of `dtype` (a view of the flat one)."""
        k = len(_ROW_FACTORS)
        key = ((k, *x.shape), dtype, x.device, threading.get_ident())
        view = self._views.get(key)
        if view is None:
            view = self.flat(k * x.numel(), dtype, x.device).view(k, *x.shape)
            self._views[key] = view
        return view

    def factors(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """_ROW_FACTORS as a (k, 1) tensor on the device (made there: no copy to it)."""
        factors = self._factors.get((dtype, device))
        if factors is None:
            factors = torch.arange(1, -2, -1, dtype=dtype, device=device).view(-1, 1)
            self._factors[(dtype, device)] = factors
        return factors

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()


def activation_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a bounded activation module (tanh, sigmoid, ...), else None."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.Tanh | nn.Softsign):
        return -1.0, 1.0
    if isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        return 0.0, 1.0
    return None


def dead_units(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """How many units of x (along `axis`; None: x is one unit) are exactly zero everywhere
    else (NaN is not zero), as a 0-d int64 tensor; no host sync."""
    if axis is None:
        return torch.count_nonzero(x).eq(0).long()
    dims = tuple(d for d in range(x.dim()) if d != axis)
    return torch.count_nonzero(x, dim=dims).eq(0).sum()


def activation_moments(
    x: torch.Tensor, scratch: Scratch, shape: tuple[int, int, int]
) -> list[torch.Tensor]:
    """MOMENTS of one tensor as 0-d and 1-d tensors on its device; no host sync, and nothing
    to recount later (the tensor need not be kept). `shape`: x as (outer, units, inner),
    units along their axis (units.unit_shape).

    The sum is a cascade sum in x's float dtype (~1e-7 relative; float64 from 2**24 values
    on); the sum of squares is the float64 norm's square, exact down to float32 subnormals
    (the squares of deep plain stacks' gradients). Extremes ignore NaN (+inf, -inf where
    there is no other value); counts are exact. Eight ops (kernels) for any tensor: the sum,
    the norm, one elementwise fill of a work buffer (see _ROW_FACTORS), one per-unit count
    and its two reductions, one NaN fill and one reduction for both extremes. The buffer is
    reused (Scratch): no allocation of x's size.
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # float32 counts are exact below 2**24 elements
    acc = torch.float64 if x.dtype == torch.float64 or x.numel() >= 1 << 24 else work_dtype
    device = x.device
    if not x.numel():
        zero = torch.zeros(1, dtype=torch.float64, device=device)
        return [zero, zero, zero.new_zeros(2), zero, zero.new_zeros(2)]
    rows = scratch.rows(x, work_dtype)
    factors = scratch.factors(work_dtype, device).view(-1, *([1] * x.dim()))
    torch.mul(x.unsqueeze(0), factors, out=rows)
    per_unit = torch.count_nonzero(rows[:2].view(2, *shape), dim=(1, 3))  # (2, units)
    counts = per_unit.sum(dim=1)  # non-zeros, non-finite values
    alive = torch.count_nonzero(per_unit[0])
    inf = math.inf
    ends = rows[::2]  # x and -x: NaN -> -inf, so that their largest values ignore NaN
    ends.nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)
    extremes = ends.amax(dim=tuple(range(1, ends.dim())))  # max, -min
    total = torch.sum(x, dtype=acc)
    return [total, torch.linalg.vector_norm(x, dtype=torch.float64), counts, alive, extremes]


def exact_sumsq(sumsq: np.ndarray, norm: np.ndarray, numel: np.ndarray | int) -> np.ndarray:
    """The float32 sums of squares where they are exact, else the float64 norm squared
    (needs_exact: a square may have under- or overflowed)."""
    sumsq = np.asarray(sumsq, dtype=np.float64)
    return np.where(needs_exact(sumsq, numel), np.square(norm), sumsq)


def saturation_band(bounds: tuple[float, float]) -> tuple[float, float]:
    """(mid, half): a value x is saturated where |x - mid| >= half, i.e. within 1% of the
    larger bound's magnitude of a bound."""
    low, high = bounds
    margin = SATURATION_MARGIN * max(abs(low), abs(high))
    return (low + high) / 2, (high - low) / 2 - margin


def saturated_count(x: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    """How many values of x lie in the saturation `band` (see saturation_band)."""
    mid, half = band
    return (x.detach() - mid).abs_().ge(half).sum()


def exact_norm(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """L2 norm accumulated in float64, as torch.linalg.vector_norm(x.double())."""
    return torch.linalg.vector_norm(x.detach(), dim=dim, dtype=torch.float64)


def needs_exact(sumsq: np.ndarray, numel: int | np.ndarray) -> np.ndarray:
    """Which float32 sums of squares may have lost squares to underflow or overflow."""
    values = np.asarray(sumsq, dtype=np.float64)
    # ~(a < b) is also true for NaN; a true 0 is cheap to confirm and rare
    return (values < np.asarray(numel) * _TINY_SQUARE) | ~(values < np.finfo(np.float32).max)


def sample_norms(g: torch.Tensor) -> torch.Tensor:
    """Per-sample float64 norms (samples along the first dimension), one op: their squares
    are the per-sample sums of squares, exact down to float32 subnormals."""
    g = g.detach()
    rows = g.reshape(1, -1) if g.dim() == 0 else g.reshape(g.shape[0], -1)
    if not rows.is_floating_point():
        rows = rows.float()
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
