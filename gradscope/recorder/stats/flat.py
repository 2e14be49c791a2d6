"""The parameters' statistics with torch ops (any device, any float dtype): a model's
parameters, or their gradients, copied into flat buffers where tensors of equal size sit
next to each other, each size group reduced as one matrix (FlatStats; the C kernels'
native.ParamStats has the same API). Eager, the sums of squares are torch's float32 cascade
sums, with the float64 norms beside them that the host takes where a square may have
under- or overflowed (torch_ops.needs_exact); on the devices fused.py is used on, one
compiled call per size group and pass, in float64, and large tensors read where they are
(ALONE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from gradscope.recorder.stats import fused

ALONE = 2**21
"""On the devices the fused statistics are used on, tensors of at least this many values are
read where they are, the way the C kernels read every tensor (native.ParamStats): copied
before the update (one foreach copy for all of them), then one compiled call each after it
that reads gradient, copy and parameter once. That is 20 bytes a float32 value a recorded
step against the flat buffers' 44 (which copy the gradients, and write the update before
summing it): 48 MB less at 2M values, 14 us at 3.35 TB/s. Smaller tensors still go through
the flat buffers, where a whole size group takes one call: read alone, each would add one
call a recorded step (a kernel launch and 25-45 us of this machine's CPU time) for less than
it saves."""


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
    tensors), two of the size of the tensors in them; they live as long as the object.

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
    the gradients (still in the work buffer) take one more pass. Tensors of ALONE values or
    more are not copied into the flat buffers: snapshot() copies each to its own buffer, and
    after() reads gradient, copy and parameter in one pass. Their gradients are then read
    after the update (`grads_after`), so the caller watches them for changes made in place by
    the optimizer, as with the C kernels (recorder/params.py).
    """

    exact = False

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.n = len(tensors)
        self._made_for = [(t.numel(), t.dtype, t.device) for t in tensors]
        self.numel = np.array([t.numel() for t in tensors], dtype=np.float64)
        # between snapshot() and after(): the present indices, gradients and read() values
        # (fused: _read_fused()'s tables)
        self._held: tuple[list[int], list[torch.Tensor], ParamValues | list[torch.Tensor]] | None
        self._held = None
        self._segments: list[_Segment] = []
        devices = fused.devices_from_env()
        present = [t for t in tensors if t.numel()]
        self.fused = bool(present) and all(fused.used_on(devices, t) for t in present)
        # (fused) the tensors read where they are, with their own pre-update copies
        self._alone = {i for i, t in enumerate(tensors) if self.fused and t.numel() >= ALONE}
        self.grads_after = bool(self._alone)  # after() reads their gradients (after the update)
        by_key: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel() and i not in self._alone:
                dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
                by_key.setdefault((dtype, t.device), []).append(i)
        for (dtype, device), idx in by_key.items():
            self._segments.append(_Segment(tensors, idx, dtype, device))
        # each tensor's pre-update copy (a zero tensor of its shape where it is empty)
        self._before: list[torch.Tensor] = [
            torch.empty_like(t, memory_format=torch.contiguous_format)
            if i in self._alone
            else torch.zeros_like(t)
            for i, t in enumerate(tensors)
        ]
        for seg in self._segments:
            for i, view in zip(seg.idx, seg.before_views, strict=True):
                self._before[i] = view
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}  # indices -> device tensor
        self._device = next((t.device for t in present), torch.device("cpu"))

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
        parameters' sums of squares, and the float64 norms of both. The parameters in the
        flat buffers are kept as the pre-update copy (the eager snapshot() is this read)."""
        if self.fused:
            tables = self._read_fused(present, grads, params, defer_alone=False)
            rows = self._rows_for(present, self._device)
            return ParamValues(*(t[rows] for t in tables))
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

    @torch.no_grad()
    def _read_fused(
        self,
        present: list[int],
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        defer_alone: bool,
    ) -> list[torch.Tensor]:
        """read() in compiled passes, float64 sums (no norms beside them), as four tables of
        one value per tensor (not only the present ones): the gradients' sums of squares,
        maxima and non-finite counts, the parameters' sums of squares. With `defer_alone`, the
        tensors read alone are only copied, their values left to after()."""
        tables = [self._empty() for _ in range(4)]
        for seg in self._segments:
            if seg.load(seg.work_views, self._spread(present, grads)):
                values = seg.fused_rows(fused.grad_rows, seg.work)
                for out, row in zip(tables[:3], values, strict=True):
                    self._put(out, seg, row)
        for seg in self._segments:
            if seg.load(seg.before_views, self._spread(present, params)):
                self._put(tables[3], seg, seg.fused_rows(fused.sumsq_rows, seg.before))
        by_itself = self._alone_present(present, grads, params)
        if by_itself and defer_alone:
            copies = [self._before[i] for i, _, _ in by_itself]
            torch._foreach_copy_(copies, [p.detach() for _, _, p in by_itself])
        elif by_itself:
            rows = self._rows_for([i for i, _, _ in by_itself], self._device)
            parts = [fused.rows(fused.read_rows, _row(g), _row(p)) for _, g, p in by_itself]
            for out, row in zip(tables, self._joined(parts), strict=True):
                out[rows] = row
        return tables

    def snapshot(
        self, present: list[int], grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> None:
        """Before the update: read() (which keeps the copy), held for after(); fused, the
        tensors read alone are only copied here, and read in after()."""
        if self.fused:
            tables = self._read_fused(present, grads, params, defer_alone=True)
            self._held = (present, grads, tables)
        else:
            self._held = (present, grads, self.read(present, grads, params))

    def after(
        self, params: list[torch.Tensor], geometry: bool
    ) -> tuple[ParamValues, torch.Tensor, torch.Tensor | None]:
        """After the update: the snapshot's read() values, the update's sums of squares and
        float64 norms (a (2, k) tensor) and, with `geometry`, its dot products with the
        gradients."""
        if self._held is None:
            raise RuntimeError("FlatStats.after() without a snapshot() before it")
        present, grads, held = self._held
        self._held = None
        if isinstance(held, list):  # fused
            return self._after_fused(present, params, grads, held, geometry)
        return (held, *self._updates(present, params, grads if geometry else None))

    @torch.no_grad()
    def _updates(
        self,
        present: list[int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sums of squares of params - the copy kept by `read()` (the applied update) and
        their float64 norms, as a (2, k) tensor; with `grads`, each update's dot product with
        its gradient, in float64 (else None)."""
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

    @torch.no_grad()
    def _after_fused(
        self,
        present: list[int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        tables: list[torch.Tensor],
        dots: bool,
    ) -> tuple[ParamValues, torch.Tensor, torch.Tensor | None]:
        """after() in compiled passes: in the flat buffers, the copy becomes before - after in
        place (it is made again at the next read), and the gradients read then are still in
        the work buffer; each tensor read alone takes one pass over gradient, copy and
        parameter, which fills its values in the snapshot's `tables` too."""
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
        alone = self._alone_present(present, grads, params)
        if alone:
            rows = self._rows_for([i for i, _, _ in alone], self._device)
            values = self._joined(
                [
                    fused.rows(fused.after_rows, _row(g), _row(self._before[i]), _row(p))
                    for i, g, p in alone
                ]
            )
            for out, row in zip((*tables, sumsq, dot), values, strict=True):
                out[rows] = row
        rows = self._rows_for(present, self._device)
        sumsq = sumsq[rows]
        read = ParamValues(*(t[rows] for t in tables))
        return read, torch.stack([sumsq, sumsq.sqrt()]), dot[rows] if dots else None

    def _joined(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor values (each (..., 1)) side by side, on the tables' device."""
        return torch.cat([part.to(self._device) for part in parts], dim=-1)

    def _alone_present(
        self, present: list[int], grads: list[torch.Tensor], params: list[torch.Tensor]
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(index, gradient, parameter) of the present tensors read alone."""
        if not self._alone:
            return []
        alone = self._alone
        return [(i, g, p) for i, g, p in zip(present, grads, params, strict=True) if i in alone]

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

    def _empty(self) -> torch.Tensor:
        return torch.zeros(self.n, dtype=torch.float64, device=self._device)

    @staticmethod
    def _put(out: torch.Tensor, seg: _Segment, values: torch.Tensor) -> None:
        out[seg.index] = values.to(out.device, torch.float64)


def _row(t: torch.Tensor) -> torch.Tensor:
    """A tensor as one row (a view where it is contiguous), without autograd."""
    return t.detach().reshape(1, -1)


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
