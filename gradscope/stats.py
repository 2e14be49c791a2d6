"""Tensor -> tensor statistics in additive form, and the stats derived from them.

Moments add across calls, micro-batches and ranks: merge them, then derive norms, means and
fractions. Sums of squares of float32 tensors use torch's cascade summation of the squares,
accurate to ~1e-7 relative at any length; where a square may have underflowed (subnormal
values: first-layer gradients at depth 100 are about 1e-39) or overflowed, the result is
flagged by `needs_exact` and the recorder redoes it in float64. Work buffers are reused
(`Scratch`, `FlatStats`), so recorded steps allocate little.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import nn

# activation moments of one module call, in the output's float dtype
ACT_FIELDS = ("sum", "min", "max", "nonzero", "sumsq", "dead_units")

SATURATION_MARGIN = 0.01  # "saturated": within 1% of a bound's magnitude of that bound
# a float32 sum of n squares is exact to ~1e-7 relative unless some squares left the normal
# range: each underflowed square loses at most 2**-149, so sums above n * 2**-126 lose at most
# 2**-23 relative; below that (or inf/NaN) they are redone in float64
_TINY_SQUARE = 2.0**-126


class Scratch:
    """Reusable flat buffers, one per (dtype, device, thread), grown to the largest request."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}
        self._views: dict[tuple[torch.Size, torch.dtype, torch.device, int], torch.Tensor] = {}

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
    x: torch.Tensor, scratch: Scratch, axis: int | None
) -> tuple[torch.Tensor, ...]:
    """Moments of one tensor (ACT_FIELDS) as 0-d tensors; no host sync.

    (Stacking them per call would cost more than the sums: callers stack many calls at once.)
    Sums are float32 cascade sums (~1e-8 relative). `nonzero` counts inf and NaN only
    approximately, and `sumsq` may have underflowed (see needs_exact): where either matters
    the recorder recounts from the tensor.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    # float32 counts are exact below 2**24 elements
    acc = torch.float64 if x.dtype == torch.float64 or x.numel() >= 1 << 24 else x.dtype
    if x.numel():
        lo, hi = torch.aminmax(x)
    else:
        lo = hi = torch.zeros((), dtype=x.dtype, device=x.device)
    work = scratch.like(x)
    sumsq = torch.mul(x, x, out=work).sum(dtype=acc)
    nonzero = torch.ne(x, 0, out=work).sum(dtype=acc)  # 1.0 for each non-zero
    dead = dead_units(x, axis).to(acc) if x.numel() else torch.zeros((), dtype=acc, device=x.device)
    return torch.sum(x, dtype=acc), lo.to(acc), hi.to(acc), nonzero, sumsq, dead


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


def activation_stats(
    total: np.ndarray,
    sumsq: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    nonzero: np.ndarray,
    count: np.ndarray,
    nonfinite: np.ndarray,
    dead: np.ndarray,
    units: np.ndarray,
) -> dict[str, np.ndarray]:
    """Derives mean, std, rms, zero_frac, min, max, nonfinite, dead_units and units from
    merged moments (arrays)."""
    n = np.maximum(count, 1.0)
    mean = total / n
    with np.errstate(invalid="ignore", over="ignore"):
        var = np.maximum(sumsq / n - mean * mean, 0.0)
        return {
            "mean": mean,
            "std": np.sqrt(var),
            "rms": np.sqrt(sumsq / n),
            "zero_frac": (count - nonzero) / n,
            "min": lo,
            "max": hi,
            "nonfinite": nonfinite.astype(np.float64),
            "dead_units": dead,
            "units": units,
        }


# one output's row inside a compiled graph (all float64): ACT_FIELDS of the recorder's
# schema, then the number of values and of saturated values
ROW_FIELDS = (
    "sum", "sumsq", "min", "max", "nonzero", "nonfinite", "dead_units", "units", "count",
    "saturated",
)  # fmt: skip
# one output gradient's row: the recorder's GRAD_FIELDS, then the number of samples
GRAD_ROW_FIELDS = ("sumsq", "sample_norm_sum", "nonfinite_samples", "samples")


def output_row(x: torch.Tensor, band: tuple[float, float] | None, axis: int | None) -> torch.Tensor:
    """ROW_FIELDS of one tensor: sums accumulated in float64 (exact at subnormal values),
    extremes and counts in the tensor's own dtype (exact there too); extremes ignore NaN.
    Pure torch ops with no host sync, so that a compiled graph fuses them into one pass
    (on a CPU, only the sums pay for float64: ~3x cheaper than everything in float64)."""
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
    return torch.stack(
        [
            wide.sum(),
            (wide * wide).sum(),
            lo,
            hi,
            x.ne(0).sum().to(torch.float64),
            (x - x).ne(0).sum().to(torch.float64),  # inf - inf and NaN - NaN are NaN
            dead_units(x, axis).to(torch.float64) if x.numel() else wide.new_zeros(()),
            wide.new_full((), (1 if axis is None else x.shape[axis]) if x.numel() else 0),
            torch.full((), x.numel(), dtype=torch.float64, device=x.device),
            saturated,
        ]
    )


def fold_rows(before: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Two ROW_FIELDS rows of one module merged: sums add, extremes and the dead units take
    min, the units max."""
    return torch.cat(
        [
            before[:2] + row[:2],
            torch.minimum(before[2:3], row[2:3]),
            torch.maximum(before[3:4], row[3:4]),
            before[4:6] + row[4:6],
            torch.minimum(before[6:7], row[6:7]),
            torch.maximum(before[7:8], row[7:8]),
            before[8:] + row[8:],
        ]
    )


def grad_row(g: torch.Tensor) -> torch.Tensor:
    """GRAD_ROW_FIELDS of one output gradient (samples along the first dimension), float64."""
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


def sample_sumsq(g: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """Per-sample sums of squares (samples along the first dimension), cascade-summed."""
    g = g.detach()
    rows = g.reshape(1, -1) if g.dim() == 0 else g.reshape(g.shape[0], -1)
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()
    return torch.mul(rows, rows, out=scratch.like(rows)).sum(dim=1)


def grad_stats(
    samples: np.ndarray, sumsq: np.ndarray, sample_norm_sum: np.ndarray, nonfinite: np.ndarray
) -> dict[str, np.ndarray]:
    """Derives `norm` over the batch, `sample_norm` (mean per-sample norm) and `nonfinite`."""
    return {
        "norm": np.sqrt(sumsq),
        "sample_norm": sample_norm_sum / np.maximum(samples, 1.0),
        "nonfinite": nonfinite.astype(np.float64),
    }


class FlatStats:
    """Per-tensor sums of squares and maxima of many tensors, read through flat buffers.

    The tensors (a model's parameters, or their gradients) are copied, in one fused call, into
    a flat buffer where tensors of equal size sit next to each other; each size group is then
    one 2-D matrix, reduced along its rows in a handful of calls (cascade sums: ~1e-7
    relative, see needs_exact). A second buffer keeps the parameters before the update, so
    the applied update is their difference. Buffers are float32 (float64 for float64
    tensors) and twice the size of the tensors; they live as long as the object.

    Methods take the indices of the tensors present this step (e.g. parameters with a
    gradient) and return one float64 value for each. Not `exact`: callers recount where
    `needs_exact` says so, and count non-finite values themselves (the count returned by
    read() is 0).
    """

    exact = False
    grads_after = False  # snapshot() reads the gradients (before the update)

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.n = len(tensors)
        self._made_for = [(t.numel(), t.dtype, t.device) for t in tensors]
        # between snapshot() and after(): the present indices, gradients and read() values
        self._held: tuple[list[int], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._segments: list[_Segment] = []
        by_key: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel():
                dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
                by_key.setdefault((dtype, t.device), []).append(i)
        for (dtype, device), idx in by_key.items():
            self._segments.append(_Segment(tensors, idx, dtype, device))

    def fits(self, present: list[int], params: list[torch.Tensor]) -> bool:
        """Whether the tensors `present` still have the size, dtype and device the buffers
        were made for (``p.data = ...`` or ``model.to(...)`` can change them)."""
        made_for = self._made_for
        return all(
            (p.numel(), p.dtype, p.device) == made_for[i]
            for i, p in zip(present, params, strict=True)
        )

    @torch.no_grad()
    def read(
        self, present: list[int], grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """For tensors `present` (their gradients and parameters given in that order): the
        gradients' sums of squares and largest absolute values, zeros for the non-finite
        counts, and the parameters' sums of squares. The parameters are always kept as the
        pre-update copy (a recount needs it)."""
        sumsq, largest = self._empty(), self._empty()
        for seg in self._segments:
            if seg.load(seg.work_views, self._spread(present, grads)):
                seg.work.abs_()
                self._put(largest, seg, seg.row_reduce(seg.work, "amax"))
                seg.work.mul_(seg.work)
                self._put(sumsq, seg, seg.row_reduce(seg.work, "sum"))
        param_sumsq = self._empty()
        for seg in self._segments:
            if seg.load(seg.before_views, self._spread(present, params)):
                torch.mul(seg.before, seg.before, out=seg.work)
                self._put(param_sumsq, seg, seg.row_reduce(seg.work, "sum"))
        rows = torch.tensor(present, device=sumsq.device)
        return [sumsq[rows], largest[rows], torch.zeros_like(sumsq[rows]), param_sumsq[rows]]

    def snapshot(
        self, present: list[int], grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> None:
        """Before the update: read() (which keeps the copy), held for after()."""
        self._held = (present, grads, self.read(present, grads, params))

    def after(
        self, params: list[torch.Tensor], geometry: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """After the update: the snapshot's read() values, the update's sums of squares and,
        with `geometry`, its dot products with the gradients."""
        if self._held is None:
            raise RuntimeError("FlatStats.after() without a snapshot() before it")
        present, grads, values = self._held
        self._held = None
        if not geometry:
            return values, self.updates(present, params), None
        both = self.updates(present, params, grads)
        return values, both[0], both[1]

    @torch.no_grad()
    def updates(
        self,
        present: list[int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Sums of squares of params - the copy kept by `read()` (the applied update); with
        `grads`, a second row: each update's dot product with its gradient, in float64."""
        sumsq = self._empty()
        for seg in self._segments:
            if seg.load(seg.work_views, self._spread(present, params)):
                seg.work.sub_(seg.before).square_()
                self._put(sumsq, seg, seg.row_reduce(seg.work, "sum"))
        sumsq = sumsq[torch.tensor(present, device=sumsq.device)]
        if grads is None:
            return sumsq
        dots = []
        for i, p, g in zip(present, params, grads, strict=True):
            before = self.before(i)
            if before is None:
                dots.append(torch.zeros((), dtype=torch.float64, device=sumsq.device))
                continue
            update = p.detach().double().flatten() - before.double().flatten()
            dots.append(torch.dot(update, g.detach().double().flatten()).to(sumsq.device))
        return torch.stack([sumsq, torch.stack(dots)])

    def _spread(self, present: list[int], tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        full: list[torch.Tensor | None] = [None] * self.n
        for i, t in zip(present, tensors, strict=True):
            full[i] = t
        return full

    def before(self, i: int) -> torch.Tensor | None:
        """The pre-update copy of tensor i (None for empty tensors)."""
        for seg in self._segments:
            if i in seg.position:
                return seg.before_views[seg.position[i]]
        return None

    def _empty(self) -> torch.Tensor:
        device = self._segments[0].device if self._segments else torch.device("cpu")
        return torch.zeros(self.n, dtype=torch.float64, device=device)

    @staticmethod
    def _put(out: torch.Tensor, seg: _Segment, values: torch.Tensor) -> None:
        out[seg.index.to(out.device)] = values.to(out.device, torch.float64)


class _Segment:
    """The tensors of one (buffer dtype, device), laid out in size groups."""

    def __init__(
        self, tensors: list[torch.Tensor], idx: list[int], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.idx = sorted(idx, key=lambda i: tensors[i].numel())
        self.position = {i: k for k, i in enumerate(self.idx)}
        sizes = [tensors[i].numel() for i in self.idx]
        shapes = [tensors[i].shape for i in self.idx]
        self.device = device
        self.work = torch.empty(sum(sizes), dtype=dtype, device=device)
        self.before = torch.empty(sum(sizes), dtype=dtype, device=device)
        self.work_views = [v.view(s) for v, s in zip(self.work.split(sizes), shapes, strict=True)]
        self.before_views = [
            v.view(s) for v, s in zip(self.before.split(sizes), shapes, strict=True)
        ]
        self.index = torch.tensor(self.idx, dtype=torch.long)
        self.groups: list[tuple[int, int, int]] = []  # (numel, start, count)
        start = 0
        for numel in sizes:
            if self.groups and self.groups[-1][0] == numel:
                self.groups[-1] = (numel, self.groups[-1][1], self.groups[-1][2] + 1)
            else:
                self.groups.append((numel, start, 1))
            start += numel

    def load(self, views: list[torch.Tensor], tensors: list[torch.Tensor | None]) -> bool:
        """Copies the given tensors into their places (`views` of a flat buffer), in one call."""
        ours = [tensors[i] for i in self.idx]
        present = [k for k, t in enumerate(ours) if t is not None]
        if len(present) == len(ours):
            torch._foreach_copy_(views, ours)  # type: ignore[arg-type]
        elif present:
            torch._foreach_copy_([views[k] for k in present], [ours[k] for k in present])  # type: ignore[misc]
        return bool(present)

    def row_reduce(self, flat: torch.Tensor, how: str) -> torch.Tensor:
        """One value per tensor, in layout order: each size group reduced along its rows."""
        parts = []
        for numel, start, count in self.groups:
            matrix = flat[start : start + numel * count].view(count, numel)
            parts.append(matrix.amax(dim=1) if how == "amax" else matrix.sum(dim=1))
        return torch.cat(parts)


def count_nonfinite(x: torch.Tensor) -> int:
    """Number of inf or NaN values in x (a host sync: used only where a result is non-finite)."""
    return int((~torch.isfinite(x)).sum().item())
