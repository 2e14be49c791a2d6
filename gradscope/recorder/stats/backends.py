"""Two ways to compute the statistics of a module output or an output gradient, with the same
results in the same rows (fields.OUTPUT, fields.GRAD): the C kernels (CPU float32/float64
tensors, exact as they go) and torch ops (every other tensor: on its device, sums of squares
in float64; parameters' float32 sums recounted in float64 where a square may have under- or
overflowed). Which one takes a tensor
is decided in one function, `choose`, for module outputs, output gradients and parameters;
nothing else in the recorder tells them apart. (The third, compiled graphs, is chosen at
attach for a compiled model: recorder/compiled.py, rows from graph_ops.py.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Protocol

import numpy as np
import torch

from gradscope.recorder.stats import flat, native
from gradscope.recorder.stats import torch_ops as stats
from gradscope.recorder.stats.fields import GRAD, OUTPUT
from gradscope.recorder.stats.fused import FusedCalls

# the C kernels write the rows in the schema's order
assert OUTPUT.names == native.OUTPUT_FIELDS and GRAD.names == native.GRAD_FIELDS


class Path(StrEnum):
    """Which implementation computes a tensor's statistics."""

    KERNELS = "kernels"
    TORCH = "torch"


def choose(tensors: Sequence[torch.Tensor]) -> Path:
    """The C kernels where they take every tensor (CPU float32/float64, kernels built; one
    dtype for a group of parameters), else torch ops: the one place that chooses."""
    if not tensors or not all(native.takes(t) for t in tensors):
        return Path.TORCH
    if len(tensors) > 1 and len({t.dtype for t in tensors}) > 1:
        return Path.TORCH
    return Path.KERNELS


# tables of no calls, by width (read-only: shared by every step)
_NO_ROWS = {width: np.zeros((0, width)) for width in (len(OUTPUT), len(GRAD))}
for _table in _NO_ROWS.values():
    _table.flags.writeable = False
_NO_OUTPUTS, _NO_GRADS = _NO_ROWS[len(OUTPUT)], _NO_ROWS[len(GRAD)]


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


Decoder = Callable[[Reader], tuple[np.ndarray, np.ndarray]]


class Backend(Protocol):
    """Per-call statistics of one step's module outputs and output gradients."""

    def moments(self, tensor: torch.Tensor, shape: tuple[int, int, int]) -> None:
        """The output's row; `shape`: the output as (outer, units, inner), units.unit_shape."""
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

    def decoder(self) -> Decoder:
        """Reads this step's rows back from the transferred vector, later: (calls,
        fields.OUTPUT) and (calls, fields.GRAD), exact, in call order. Keeps what it needs
        of the step (the backend is reset for the next)."""
        ...

    def reset(self) -> None: ...


class NativeBackend:
    """The C kernels: each call's exact row written straight into a host table."""

    def __init__(self) -> None:
        self._acts = _HostRows(len(OUTPUT))
        self._grads = _HostRows(len(GRAD))

    def moments(self, tensor: torch.Tensor, shape: tuple[int, int, int]) -> None:
        native.output_row(tensor, shape, self._acts.take(1))

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

    def decoder(self) -> Decoder:
        acts, grads = self._acts.rows(), self._grads.rows()
        tables = (
            acts.copy() if len(acts) else _NO_OUTPUTS,
            grads.copy() if len(grads) else _NO_GRADS,
        )
        return lambda reader: tables

    def reset(self) -> None:
        self._acts.reset()
        self._grads.reset()


class TorchBackend:
    """Torch ops on the tensor's device: each call's values stay there until the step's one
    transfer, so no tensor is kept and nothing waits for the device."""

    def __init__(self) -> None:
        self._scratch = stats.Scratch()
        self._fused = FusedCalls()
        self.reset()

    def reset(self) -> None:
        # per output call, flat: torch_ops.MOMENTS (7 values, in 5 tensors, or in one where
        # fused.py computed them)
        self._moments: list[torch.Tensor] = []
        self._last_parts = 0  # tensors of the last output call
        self._units: list[int] = []
        # per gradient call: the per-sample float64 norms, and its number of samples
        self._sample_norms: list[torch.Tensor] = []
        self._samples: list[int] = []

    def clear(self) -> None:
        self._scratch.clear()

    def moments(self, tensor: torch.Tensor, shape: tuple[int, int, int]) -> None:
        row = self._fused.moments(tensor, shape)
        parts = [row] if row is not None else stats.activation_moments(tensor, self._scratch, shape)
        self._moments.extend(parts)
        self._last_parts = len(parts)
        self._units.append(shape[1] if tensor.numel() else 0)

    def repeat_moments(self) -> None:
        self._moments.extend(self._moments[len(self._moments) - self._last_parts :])
        self._units.append(self._units[-1])

    def repeat_grad(self) -> None:
        self._sample_norms.append(self._sample_norms[-1])
        self._samples.append(self._samples[-1])

    def saturated(self, tensor: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
        return stats.saturated_count(tensor, band)

    def grad(self, grad: torch.Tensor, samples: int) -> None:
        norms = self._fused.sample_norms(grad)
        self._sample_norms.append(stats.sample_norms(grad) if norms is None else norms)
        self._samples.append(samples)

    def device_parts(self) -> list[torch.Tensor]:
        return [*self._moments, *self._sample_norms]

    def decoder(self) -> Decoder:
        if not self._units and not self._samples:  # the usual step on the CPU: no call here
            return _no_calls
        units = np.array(self._units, dtype=np.float64)
        samples = list(self._samples)
        return lambda reader: (_output_table(reader, units), _grad_table(reader, samples))


def _no_calls(reader: Reader) -> tuple[np.ndarray, np.ndarray]:
    return _NO_OUTPUTS, _NO_GRADS


def _output_table(reader: Reader, units: np.ndarray) -> np.ndarray:
    """TorchBackend's output rows as transferred -> (calls, fields.OUTPUT)."""
    calls = len(units)
    if not calls:  # the usual case on the CPU: the kernels took every call
        return _NO_OUTPUTS
    values = reader.take(len(stats.MOMENTS) * calls).reshape(calls, -1)
    got = dict(zip(stats.MOMENTS, values.T, strict=True))
    table = np.empty((calls, len(OUTPUT)))
    col = OUTPUT.columns(table)
    col["sum"][:] = got["sum"]
    col["sumsq"][:] = np.square(got["norm"])
    col["min"][:] = -got["neg_min"]
    col["max"][:] = got["max"]
    col["nonzero"][:] = got["nonzero"]
    col["nonfinite"][:] = got["nonfinite"]
    col["dead_units"][:] = units - got["alive_units"]
    col["units"][:] = units
    return table


def _grad_table(reader: Reader, samples: list[int]) -> np.ndarray:
    """TorchBackend's gradient rows as transferred -> (calls, fields.GRAD)."""
    if not samples:
        return _NO_GRADS
    norms = reader.take(sum(samples))
    table = np.empty((len(samples), len(GRAD)))
    col = GRAD.columns(table)
    calls = np.repeat(np.arange(len(samples)), samples)
    size = len(samples)
    col["sumsq"][:] = np.bincount(calls, np.square(norms), minlength=size)
    col["sample_norm_sum"][:] = np.bincount(calls, norms, minlength=size)
    col["nonfinite_samples"][:] = np.bincount(calls, ~np.isfinite(norms), minlength=size)
    return table


class Backends:
    """Both backends of a recorder, and the one place that chooses between them."""

    def __init__(self) -> None:
        self.native = NativeBackend()
        self.torch = TorchBackend()
        self.all: tuple[Backend, ...] = (self.native, self.torch)

    def for_tensor(self, tensor: torch.Tensor) -> Backend:
        # choose() for one tensor, without building its argument (a call per module output
        # and output gradient)
        return self.native if native.takes(tensor) else self.torch

    def reset(self) -> None:
        for backend in self.all:
            backend.reset()


def param_stats(tensors: list[torch.Tensor]) -> flat.FlatStats | native.ParamStats:
    """Parameter statistics (with their buffers): the C kernels where they take every
    parameter (CPU, one float dtype), else torch ops over flat size-grouped buffers."""
    if choose(tensors) is Path.KERNELS:
        return native.ParamStats(tensors)
    return flat.FlatStats(tensors)


def exact_param_values(
    values: flat.ParamValues, update: np.ndarray | None, numel: np.ndarray | None
) -> tuple[flat.ParamValues, np.ndarray | None]:
    """On the host, after the transfer: the torch ops' float32 sums of squares where they are
    exact, else their float64 recounts (`numel`: each parameter's size; None: the kernels'
    values, exact already); `update`: the update's sums of squares, for the torch ops the
    (2, k) float32 sums and float64 norms, flat."""
    if numel is None:  # exact already
        return values, update
    if values.grad_norm is not None:
        values = flat.ParamValues(
            stats.exact_sumsq(values.grad_sumsq, values.grad_norm, numel),
            values.grad_max,
            values.nonfinite,
            stats.exact_sumsq(values.param_sumsq, values.param_norm, numel),
        )
    if update is not None:  # (2, k) as transferred: the float32 sums, the float64 norms
        pair = update.reshape(2, -1)
        update = stats.exact_sumsq(pair[0], pair[1], numel)
    return values, update


def second_moments(states: list[torch.Tensor | None]) -> torch.Tensor | np.ndarray:
    """Sums of squares of the optimizer's second-moment states, in float64 (NaN: none), on
    the states' device (a host array where there are none): one foreach norm (a kernel per
    device and dtype group where the device has one, not one per state)."""
    present = [s for s in states if s is not None]
    if not present:  # SGD and other optimizers without one
        return np.full(len(states), math.nan)
    device = present[0].device
    with torch.no_grad():
        norms = iter(torch._foreach_norm(present, 2, dtype=torch.float64))
        nan = torch.full((), math.nan, dtype=torch.float64, device=device)  # no host copy
        return torch.stack([next(norms).to(device) if s is not None else nan for s in states]) ** 2


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
