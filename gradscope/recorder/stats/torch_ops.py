"""The per-call statistics computed with torch ops (any device, any float dtype), in additive
form: they add across calls, micro-batches and ranks (fields.py), and derive.py turns them
into norms, means and fractions. Module outputs and output gradients: sums of squares are
float64 norms squared, exact down to float32 subnormals (first-layer gradients at depth 100
are about 1e-39), a few ops a call (activation_moments, sample_norms). Parameters: torch's
cascade sums of the squares over flat size groups (~1e-7 relative at any length); where a
square may have underflowed or overflowed, `needs_exact` flags the sum and the host takes
the float64 norm computed beside it. Work buffers are reused (`Scratch`, `FlatStats`), so
recorded steps allocate little.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from gradscope.recorder.stats import fused

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


class ParamValues(NamedTuple):
    """A step's per-parameter statistics (device tensors until the step's transfer, then
    host arrays), one value per present parameter. `grad_norm` and `param_norm`: the float64
    norms that replace the float32 sums of squares where those may have lost squares (the
    torch ops; exact_sumsq chooses on the host), None where the sums are exact already."""

    grad_sumsq: Any
    grad_max: Any
    nonfinite: Any
    param_sumsq: Any
    grad_norm: Any = None
    param_norm: Any = None


class FlatStats:
    """Per-tensor sums of squares and maxima of many tensors, read through flat buffers.

    The tensors (a model's parameters, or their gradients) are copied, in one fused call, into
    a flat buffer where tensors of equal size sit next to each other; each size group is then
    one 2-D matrix, reduced along its rows in a handful of calls (cascade sums: ~1e-7
    relative, see needs_exact). A second buffer keeps the parameters before the update, so
    the applied update is their difference. Buffers are float32 (float64 for float64
    tensors) and twice the size of the tensors; they live as long as the object.

    Methods take the indices of the tensors present this step (e.g. parameters with a
    gradient) and return one float64 value for each, on the device: nothing waits for it.
    Beside each float32 sum of squares they give the float64 norm of the same tensor (the
    foreach norm, one kernel per device and dtype group where the device has one, as
    torch.nn.utils.clip_grad_norm_ does), which the host takes where needs_exact says so
    (`exact` is False).

    On the devices the fused statistics are used on (fused.py: CUDA), each size group is
    instead reduced by one compiled call per pass, in float64 (no recount needed): the
    gradients' three values in one pass, the parameters' sums in one, and after the update
    the copy becomes `before - after` in place, whose sums of squares and dot products with
    the gradients (still in the work buffer) take one more pass.
    """

    exact = False
    grads_after = False  # snapshot() reads the gradients (before the update)

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.n = len(tensors)
        self._made_for = [(t.numel(), t.dtype, t.device) for t in tensors]
        self.numel = np.array([t.numel() for t in tensors], dtype=np.float64)
        # between snapshot() and after(): the present indices, gradients and read() values
        self._held: tuple[list[int], list[torch.Tensor], ParamValues] | None = None
        self._segments: list[_Segment] = []
        by_key: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel():
                dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
                by_key.setdefault((dtype, t.device), []).append(i)
        for (dtype, device), idx in by_key.items():
            self._segments.append(_Segment(tensors, idx, dtype, device))
        # each tensor's pre-update copy (a zero tensor of its shape where it is empty)
        self._before: list[torch.Tensor] = [torch.zeros_like(t) for t in tensors]
        for seg in self._segments:
            for i, view in zip(seg.idx, seg.before_views, strict=True):
                self._before[i] = view
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}  # present -> device index
        devices = fused.devices_from_env()
        self.fused = bool(self._segments) and all(
            fused.used_on(devices, seg.work) for seg in self._segments
        )

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
    ) -> ParamValues:
        """For tensors `present` (their gradients and parameters given in that order): the
        gradients' sums of squares, largest absolute values and non-finite counts, the
        parameters' sums of squares, and the float64 norms of both. The parameters are
        always kept as the pre-update copy."""
        if self.fused:
            return self._read_fused(present, grads, params)
        sumsq, largest, bad = self._empty(), self._empty(), self._empty()
        for seg in self._segments:
            if seg.load(seg.work_views, self._spread(present, grads)):
                self._put(bad, seg, seg.row_reduce(torch.isfinite(seg.work).logical_not_(), "sum"))
                seg.work.abs_()
                self._put(largest, seg, seg.row_reduce(seg.work, "amax"))
                seg.work.mul_(seg.work)
                self._put(sumsq, seg, seg.row_reduce(seg.work, "sum"))
        param_sumsq = self._empty()
        for seg in self._segments:
            if seg.load(seg.before_views, self._spread(present, params)):
                torch.mul(seg.before, seg.before, out=seg.work)
                self._put(param_sumsq, seg, seg.row_reduce(seg.work, "sum"))
        rows = self._rows_for(present, sumsq.device)
        before = [self._before[i] for i in present]
        return ParamValues(
            sumsq[rows],
            largest[rows],
            bad[rows],
            param_sumsq[rows],
            self._norms(grads, sumsq.device),
            self._norms(before, sumsq.device),
        )

    def _read_fused(
        self, present: list[int], grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> ParamValues:
        """read() in compiled passes, float64 sums (no norms beside them)."""
        sumsq, largest, bad = self._empty(), self._empty(), self._empty()
        for seg in self._segments:
            if seg.load(seg.work_views, self._spread(present, grads)):
                values = seg.fused_rows(fused.grad_rows, seg.work)
                for out, row in zip((sumsq, largest, bad), values, strict=True):
                    self._put(out, seg, row)
        param_sumsq = self._empty()
        for seg in self._segments:
            if seg.load(seg.before_views, self._spread(present, params)):
                self._put(param_sumsq, seg, seg.fused_rows(fused.sumsq_rows, seg.before))
        rows = self._rows_for(present, sumsq.device)
        return ParamValues(sumsq[rows], largest[rows], bad[rows], param_sumsq[rows])

    def snapshot(
        self, present: list[int], grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> None:
        """Before the update: read() (which keeps the copy), held for after()."""
        self._held = (present, grads, self.read(present, grads, params))

    def after(
        self, params: list[torch.Tensor], geometry: bool
    ) -> tuple[ParamValues, torch.Tensor, torch.Tensor | None]:
        """After the update: the snapshot's read() values, the update's sums of squares and
        float64 norms (a (2, k) tensor) and, with `geometry`, its dot products with the
        gradients."""
        if self._held is None:
            raise RuntimeError("FlatStats.after() without a snapshot() before it")
        present, grads, values = self._held
        self._held = None
        return (values, *self.updates(present, params, grads if geometry else None))

    @torch.no_grad()
    def updates(
        self,
        present: list[int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sums of squares of params - the copy kept by `read()` (the applied update) and
        their float64 norms, as a (2, k) tensor; with `grads`, each update's dot product with
        its gradient, in float64 (else None)."""
        if self.fused:
            return self._updates_fused(present, params, grads is not None)
        sumsq = self._empty()
        for seg in self._segments:
            if seg.load(seg.work_views, self._spread(present, params)):
                seg.work.sub_(seg.before).square_()
                self._put(sumsq, seg, seg.row_reduce(seg.work, "sum"))
        device = sumsq.device
        sumsq = sumsq[self._rows_for(present, device)]
        before = [self._before[i] for i in present]
        diffs = torch._foreach_sub([p.detach() for p in params], before)
        both = torch.stack([sumsq, self._norms(list(diffs), device)])
        if grads is None:
            return both, None
        dots = []
        for p, b, g in zip(params, before, grads, strict=True):
            update = p.detach().double().flatten() - b.double().flatten()
            dots.append(torch.dot(update, g.detach().double().flatten()).to(device))
        return both, torch.stack(dots)

    def _updates_fused(
        self, present: list[int], params: list[torch.Tensor], dots: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """updates() in compiled passes: the copy becomes before - after in place (it is made
        again at the next read), and the gradients read then are still in the work buffer."""
        sumsq, dot = self._empty(), self._empty()
        full = self._spread(present, [p.detach() for p in params])
        for seg in self._segments:
            pairs = [(view, full[i]) for view, i in zip(seg.before_views, seg.idx, strict=True)]
            pairs = [(view, p) for view, p in pairs if p is not None]
            if pairs:
                torch._foreach_sub_([v for v, _ in pairs], [p for _, p in pairs])  # type: ignore[misc]
                values = seg.fused_rows(fused.update_rows, seg.before, seg.work)
                self._put(sumsq, seg, values[0])
                self._put(dot, seg, values[1])
        rows = self._rows_for(present, sumsq.device)
        sumsq = sumsq[rows]
        return torch.stack([sumsq, sumsq.sqrt()]), dot[rows] if dots else None

    @staticmethod
    def _norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """float64 L2 norms, one foreach call (grouped by device and dtype inside)."""
        if not tensors:
            return torch.zeros(0, dtype=torch.float64, device=device)
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
        return torch.stack([n.to(device) for n in norms])

    def _rows_for(self, present: list[int], device: torch.device) -> torch.Tensor:
        """The present indices as a device tensor, made once per set (a host-to-device copy
        the first time, without blocking)."""
        key = tuple(present)
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = _to_device(torch.tensor(present, dtype=torch.long), device)
        return rows

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
        out[seg.index] = values.to(out.device, torch.float64)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied without blocking (from page-locked memory)."""
    if device.type == "cpu":
        return t
    if torch.cuda.is_available():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


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
        self.index = _to_device(torch.tensor(self.idx, dtype=torch.long), device)
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

    def fused_rows(
        self, fn: Callable[..., torch.Tensor], flat: torch.Tensor, *more: torch.Tensor
    ) -> torch.Tensor:
        """fn (fused.py) of each size group's rows of `flat` (and of the same rows of `more`),
        one compiled call per group, joined: (values, tensors) in layout order."""
        parts = []
        for numel, start, count in self.groups:
            part = slice(start, start + numel * count)
            parts.append(
                fused.rows(
                    fn, flat[part].view(count, numel), *(m[part].view(count, numel) for m in more)
                )
            )
        return torch.cat(parts, dim=-1)

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
