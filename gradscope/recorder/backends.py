"""Two ways to compute the statistics of a module output or an output gradient, with the same
results in the same schema: the C kernels (CPU float32/float64 tensors, exact as they go) and
torch ops (every other tensor: cascade sums on the device, recounted in float64 where a square
may have under- or overflowed). Which one takes a tensor is decided in `Backends.for_tensor`,
and for the parameters in `param_stats`; nothing else in the recorder tells them apart.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from gradscope import native, stats
from gradscope.recorder.stats.units import unit_shape

# The per-call schema both backends fill, in this order: an output's moments (reduced over
# calls and ranks by sum, except min and max), its dead units (min) and units (max), and an
# output gradient's sums.
ACT_FIELDS = ("sum", "sumsq", "min", "max", "nonzero", "nonfinite", "dead_units", "units")
GRAD_FIELDS = ("sumsq", "sample_norm_sum", "nonfinite_samples")
assert ACT_FIELDS[:6] == native.MOMENT_FIELDS and GRAD_FIELDS == native.GRAD_FIELDS


# tables of no calls, by width (read-only: shared by every step)
_NO_ROWS = {width: np.zeros((0, width)) for width in (len(ACT_FIELDS), len(GRAD_FIELDS))}
for _table in _NO_ROWS.values():
    _table.flags.writeable = False


class Reader:
    """Reads consecutive slices of the step's one host vector (the device parts, joined)."""

    def __init__(self, flat: np.ndarray) -> None:
        self.flat, self.offset = flat, 0

    def take(self, n: int) -> np.ndarray:
        out = self.flat[self.offset : self.offset + n]
        self.offset += n
        return out

    def part(self, part: torch.Tensor | np.ndarray) -> np.ndarray:
        """A part as it came to the host: a host array as it is, a tensor from the vector."""
        return part if isinstance(part, np.ndarray) else self.take(part.numel())


class Backend(Protocol):
    """Per-call statistics of one step's module outputs and output gradients."""

    def moments(self, tensor: torch.Tensor, axis: int | None) -> None:
        """The output's row; `axis`: its units' dim (units.unit_axis)."""
        ...

    def repeat_moments(self) -> None:
        """The last call's moments again (the same tensor seen by another module)."""
        ...

    def saturated(self, tensor: torch.Tensor, band: tuple[float, float]) -> torch.Tensor: ...
    def grad(self, grad: torch.Tensor, samples: int) -> None: ...
    def repeat_grad(self) -> None:
        """The last call's gradient sums again."""
        ...

    def device_parts(self) -> list[torch.Tensor]:
        """What must come to the host in the step's one transfer, in the order read back."""
        ...

    def activation_table(self, reader: Reader) -> np.ndarray:
        """(calls, ACT_FIELDS), exact, in the order the calls were made."""
        ...

    def grad_table(self, reader: Reader) -> np.ndarray:
        """(calls, GRAD_FIELDS), exact, in the order the calls were made."""
        ...

    def reset(self) -> None: ...


class NativeBackend:
    """The C kernels: each call's exact row written straight into a host table."""

    def __init__(self) -> None:
        self._acts = _HostRows(len(ACT_FIELDS))
        self._grads = _HostRows(len(GRAD_FIELDS))

    def moments(self, tensor: torch.Tensor, axis: int | None) -> None:
        native.output_row(tensor, unit_shape(tensor.shape, axis), self._acts.take(1))

    def repeat_moments(self) -> None:
        self._acts.repeat()

    def repeat_grad(self) -> None:
        self._grads.repeat()

    def saturated(self, tensor: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
        return torch.tensor(native.saturated(tensor, band), dtype=torch.float64)

    def grad(self, grad: torch.Tensor, samples: int) -> None:
        native.grad_rows(grad, samples, self._grads.take(1))

    def device_parts(self) -> list[torch.Tensor]:
        return []

    def activation_table(self, reader: Reader) -> np.ndarray:
        return self._acts.rows()

    def grad_table(self, reader: Reader) -> np.ndarray:
        return self._grads.rows()

    def reset(self) -> None:
        self._acts.reset()
        self._grads.reset()


class TorchBackend:
    """Torch ops on the tensor's device; outputs and gradients are held until the step closes
    so that sums that may have lost squares (or met inf/NaN) are recounted exactly."""

    def __init__(self) -> None:
        self._scratch = stats.Scratch()
        self.reset()

    def reset(self) -> None:
        self._moments: list[torch.Tensor] = []  # stats.ACT_FIELDS of each call, flat
        self._outputs: list[torch.Tensor] = []
        self._units: list[int] = []
        self._sample_sumsq: list[torch.Tensor] = []
        self._grads: list[tuple[torch.Tensor, int]] = []

    def clear(self) -> None:
        self._scratch.clear()

    def moments(self, tensor: torch.Tensor, axis: int | None) -> None:
        self._moments.extend(stats.activation_moments(tensor, self._scratch, axis))
        self._outputs.append(tensor)
        self._units.append((1 if axis is None else tensor.shape[axis]) if tensor.numel() else 0)

    def repeat_moments(self) -> None:
        self._moments.extend(self._moments[-len(stats.ACT_FIELDS) :])
        self._outputs.append(self._outputs[-1])
        self._units.append(self._units[-1])

    def repeat_grad(self) -> None:
        self._sample_sumsq.append(self._sample_sumsq[-1])
        self._grads.append(self._grads[-1])

    def saturated(self, tensor: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
        return stats.saturated_count(tensor, band)

    def grad(self, grad: torch.Tensor, samples: int) -> None:
        self._sample_sumsq.append(stats.sample_sumsq(grad, self._scratch))
        self._grads.append((grad, samples))

    def device_parts(self) -> list[torch.Tensor]:
        parts = []
        if self._moments:
            parts.append(stack_float64(self._moments))
        if self._sample_sumsq:
            parts.append(cat_float64(self._sample_sumsq))
        return parts

    def activation_table(self, reader: Reader) -> np.ndarray:
        if not self._outputs:  # the usual case on the CPU: the kernels took every call
            return _NO_ROWS[len(ACT_FIELDS)]
        fields = len(stats.ACT_FIELDS)  # sum, min, max, nonzero, sumsq, dead_units
        raw = reader.take(fields * len(self._outputs)).reshape(-1, fields)
        table = np.zeros((len(self._outputs), len(ACT_FIELDS)))
        table[:, :5] = raw[:, [0, 4, 1, 2, 3]]
        table[:, 6] = raw[:, 5]
        table[:, 7] = self._units
        numel = np.array([t.numel() for t in self._outputs], dtype=np.float64)
        suspect = ~np.isfinite(table).all(axis=1) | stats.needs_exact(table[:, 1], numel)
        for i in np.flatnonzero(suspect):  # recount from the held output
            tensor = self._outputs[i]
            table[i, 1] = float(stats.exact_norm(tensor)) ** 2
            if not np.isfinite(table[i]).all():
                table[i, 5] = stats.count_nonfinite(tensor)
                table[i, 4] = float(torch.count_nonzero(tensor))
                finite = tensor[~torch.isnan(tensor)]  # extremes ignore NaN, as the kernels do
                table[i, 2:4] = (
                    [float(finite.min()), float(finite.max())] if finite.numel() else np.nan
                )
        return table

    def grad_table(self, reader: Reader) -> np.ndarray:
        if not self._grads:
            return _NO_ROWS[len(GRAD_FIELDS)]
        table = np.zeros((len(self._grads), len(GRAD_FIELDS)))
        sample_sumsq = reader.take(sum(samples for _, samples in self._grads))
        start = 0
        for c, (grad, samples) in enumerate(self._grads):
            sumsq = sample_sumsq[start : start + samples]
            start += samples
            if stats.needs_exact(sumsq, grad.numel() // max(samples, 1)).any():
                matrix = grad.reshape(1, -1) if grad.dim() == 0 else grad.reshape(samples, -1)
                sumsq = np.square(stats.exact_norm(matrix, dim=1).cpu().numpy())
            norms = np.sqrt(sumsq)
            table[c] = sumsq.sum(), norms.sum(), np.count_nonzero(~np.isfinite(norms))
        return table


class Backends:
    """Both backends of a recorder, and the one place that chooses between them."""

    def __init__(self) -> None:
        self.native = NativeBackend()
        self.torch = TorchBackend()
        self.all: tuple[Backend, ...] = (self.native, self.torch)

    def for_tensor(self, tensor: torch.Tensor) -> Backend:
        return self.native if native.takes(tensor) else self.torch

    def reset(self) -> None:
        for backend in self.all:
            backend.reset()


def param_stats(tensors: list[torch.Tensor]) -> stats.FlatStats | native.ParamStats:
    """Parameter statistics (with their buffers): the C kernels where they take every
    parameter (CPU, one float dtype), else torch ops over flat size-grouped buffers."""
    if native.ParamStats.usable(tensors):
        return native.ParamStats(tensors)
    return stats.FlatStats(tensors)


def recount_params(
    flat: stats.FlatStats | native.ParamStats,
    present: list[int],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    values: list[np.ndarray],
    update_sumsq: np.ndarray | None,
) -> None:
    """Redoes in float64, in place, the torch-op sums where a float32 square may have under-
    or overflowed, and counts non-finite gradient values (the kernels' sums are exact).

    `params` and `grads`: each present parameter and its gradient as this rank holds them
    (after the update); `values`: the read's grad sumsq, grad max, nonfinite, param sumsq.
    """
    if flat.exact:
        return
    grad_sumsq, _, nonfinite, param_sumsq = values
    numel = np.array([p.numel() for p in params])
    for k in np.flatnonzero(stats.needs_exact(grad_sumsq, numel)):
        grad_sumsq[k] = float(stats.exact_norm(grads[k])) ** 2
        if not np.isfinite(grad_sumsq[k]):
            nonfinite[k] = stats.count_nonfinite(grads[k])
    for k in np.flatnonzero(stats.needs_exact(param_sumsq, numel)):
        param_sumsq[k] = float(stats.exact_norm(flat.before(present[k]))) ** 2  # type: ignore[arg-type]
    if update_sumsq is not None:
        for k in np.flatnonzero(stats.needs_exact(update_sumsq, numel)):
            diff = params[k].detach() - flat.before(present[k])  # type: ignore[operator]
            update_sumsq[k] = float(stats.exact_norm(diff)) ** 2


def second_moments(states: list[torch.Tensor | None]) -> torch.Tensor | np.ndarray:
    """Sums of squares of the optimizer's second-moment states, in float64 (NaN: none), on
    the states' device (a host array where there are none)."""
    present = [s for s in states if s is not None]
    if not present:  # SGD and other optimizers without one
        return np.full(len(states), math.nan)
    device = present[0].device
    with torch.no_grad():
        nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        return torch.stack(
            [
                torch.linalg.vector_norm(s, dtype=torch.float64).to(device) ** 2
                if s is not None
                else nan
                for s in states
            ]
        )


class _HostRows:
    """A growing float64 table on the host: the C kernels write each call's row into it."""

    def __init__(self, width: int) -> None:
        self._table = np.empty((64, width))
        self._address = self._table.ctypes.data
        self._row_bytes = width * self._table.itemsize
        self._used = 0

    def take(self, n: int) -> int:
        """The address of the next n rows (to be written at once: a later take may move the
        table)."""
        if self._used + n > len(self._table):
            grown = np.empty((max(2 * len(self._table), self._used + n), self._table.shape[1]))
            grown[: self._used] = self._table[: self._used]
            self._table = grown
            self._address = self._table.ctypes.data
        address = self._address + self._used * self._row_bytes
        self._used += n
        return address

    def repeat(self) -> None:
        """Writes the last row again, as the next."""
        self.take(1)
        self._table[self._used - 1] = self._table[self._used - 2]

    def rows(self) -> np.ndarray:
        return self._table[: self._used]

    def reset(self) -> None:
        self._used = 0


def stack_float64(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stacks equal-shape tensors of possibly mixed float dtypes into one float64 tensor."""
    if all(p.dtype == parts[0].dtype for p in parts):
        return torch.stack(parts).to(torch.float64)
    return torch.stack([p.to(torch.float64) for p in parts])


def cat_float64(parts: list[torch.Tensor]) -> torch.Tensor:
    if all(p.dtype == parts[0].dtype for p in parts):
        return torch.cat(parts).to(torch.float64)
    return torch.cat([p.to(torch.float64) for p in parts])
