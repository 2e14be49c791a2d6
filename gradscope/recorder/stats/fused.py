"""Statistics as compiled functions (torch.compile; Triton kernels on a GPU), where the eager
torch ops would make recording memory-bound: each reads its input once and writes nothing
of its size.

- A module output (`moments`): the values of torch_ops.activation_moments, in its MOMENTS
  order, as one float64 tensor of 7, so that the step's transfer and its decoding do not
  change. The eager ops read an output several times and fill a work buffer three times its
  size; fused, it is read once: every value is first reduced per unit (its sums, counts and
  extremes; one reduction kernel), then those few per-unit values to the whole output's.
  Its sums are accumulated in float64 (the eager sum uses the output's dtype below 2**24
  values).
- An output gradient (`sample_norms`): its per-sample float64 norms, as the eager op gives
  them, without the float64 copy of the gradient that op makes first.
- The parameters (`grad_rows`, `sumsq_rows`, `update_rows`), one call per size group of
  flat.FlatStats's flat buffers: float64 sums of squares (exact: no float64 recount
  beside them), largest |g| ignoring NaN and non-finite counts in one pass over the
  gradients, and the update's sum of squares and dot product with the gradient in one pass.
  Large parameters are read where they are, one call each, as the C kernels read them:
  after the update, `after_rows` reads gradient, pre-update copy and parameter in one pass
  for all six values (`read_rows` where there is no update).

Each is compiled once per dtype and layout, with dynamic sizes; none reads a value on the
host, and each traces as one graph (tests/test_fused.py). Used by default for
CUDA tensors; GRADSCOPE_FUSED=1 uses them on every device (the CPU included, for checks),
GRADSCOPE_FUSED=0 never. Where compiling fails (no Triton, an old GPU), one warning, and eager
ops from then on for that function, device and dtype.
"""

from __future__ import annotations

import functools
import math
import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

DEFAULT_DEVICES = frozenset({"cuda"})
_F64 = torch.float64

# (function, device type, dtype) whose compile failed in this process
_FAILED: set[tuple[str, str, torch.dtype]] = set()


def devices_from_env() -> frozenset[str] | None:
    """The device types the fused statistics are used on (None: every one), from
    GRADSCOPE_FUSED ("1": all, "0": none, else DEFAULT_DEVICES)."""
    setting = os.environ.get("GRADSCOPE_FUSED", "").strip()
    if setting == "1":
        return None
    if setting == "0":
        return frozenset()
    return DEFAULT_DEVICES


def used_on(devices: frozenset[str] | None, tensor: torch.Tensor) -> bool:
    return devices is None or tensor.device.type in devices


# -- the functions compiled ---------------------------------------------------------------


def moments(x: torch.Tensor, outer: int, units: int, inner: int) -> torch.Tensor:
    """torch_ops.MOMENTS of x (seen as outer x units x inner), as one float64 tensor: each
    statistic reduced per unit first (the same reduction for all, so one pass over x), then
    over the units."""
    x = x.detach().reshape(outer, units, inner)
    wide = x.to(_F64)
    number = x == x  # not NaN
    per_unit = (0, 2)
    nonzero = x.ne(0).sum(dim=per_unit)
    return torch.stack(
        [
            wide.sum(dim=per_unit).sum(),
            (wide * wide).sum(dim=per_unit).sum().sqrt(),
            nonzero.sum().to(_F64),
            (x - x).ne(0).sum(dim=per_unit).sum().to(_F64),  # inf - inf, NaN - NaN: NaN
            nonzero.ne(0).sum().to(_F64),
            torch.where(number, x, -math.inf).amax(dim=per_unit).amax().to(_F64),
            -torch.where(number, x, math.inf).amin(dim=per_unit).amin().to(_F64),
        ]
    )


def sample_norms(g: torch.Tensor) -> torch.Tensor:
    """torch_ops.sample_norms (samples along the first dimension), without the float64 copy
    of the gradient that torch.linalg.vector_norm(dtype=float64) makes."""
    rows = g.detach().reshape(1, -1) if g.dim() == 0 else g.detach().reshape(g.shape[0], -1)
    wide = rows.to(_F64)
    return (wide * wide).sum(dim=1).sqrt()


def grad_rows(g: torch.Tensor) -> torch.Tensor:
    """For each row of g (one gradient of a size group): its float64 sum of squares, largest
    |value| ignoring NaN (0 where there is none, as the C kernels) and non-finite count, as a
    (3, rows) float64 tensor."""
    wide = g.to(_F64)
    size = g.abs()
    largest = torch.where(size == size, size, 0).amax(dim=1)
    return torch.stack(
        [(wide * wide).sum(dim=1), largest.to(_F64), (g - g).ne(0).sum(dim=1).to(_F64)]
    )


def sumsq_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row's float64 sum of squares."""
    wide = x.to(_F64)
    return (wide * wide).sum(dim=1)


def read_rows(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """For each row (gradient, parameter): grad_rows(g)'s three values, then the parameter's
    float64 sum of squares, as a (4, rows) float64 tensor."""
    return torch.cat([grad_rows(g), sumsq_rows(p)[None]])


def after_rows(g: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """For each row (gradient, parameter before and after the update): read_rows(g, before)'s
    four values, then the update's float64 sum of squares and dot product with the gradient
    (the difference taken in float32, or float64 for float64 tensors, as the flat buffers take
    it), as a (6, rows) float64 tensor: one pass over the three."""
    exact = _F64 if after.dtype == _F64 else torch.float32
    update = (after.to(exact) - before.to(exact)).to(_F64)
    step = torch.stack([(update * update).sum(dim=1), (update * g.to(_F64)).sum(dim=1)])
    return torch.cat([read_rows(g, before), step])


def update_rows(minus_update: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """For each row (before - after, and the gradient): the update's float64 sum of squares
    and its dot product with the gradient, as a (2, rows) float64 tensor."""
    wide = minus_update.to(_F64)
    return torch.stack([(wide * wide).sum(dim=1), -(wide * g.to(_F64)).sum(dim=1)])


@functools.cache
def compiled(
    fn: Callable[..., torch.Tensor], dtype: torch.dtype, dim: int
) -> Callable[..., torch.Tensor]:
    """fn compiled for inputs of one dtype and number of dimensions (once per process: every
    recorder shares its graphs). Each pair gets its own copy of fn: dynamo keeps its graphs
    by code object and compiles one object at most torch._dynamo.config.recompile_limit (8)
    times, then runs it uncompiled. A copy holds only its own kind's few graphs (contiguous or
    not, sizes 0 or 1), so that a process with many kinds of output never reaches it."""
    code = fn.__code__.replace()  # a new code object: its own graphs
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(copy, dynamic=True)


def works(fn: Callable[..., torch.Tensor], x: torch.Tensor) -> bool:
    """Whether fn's compiled form has not failed for x's device and dtype."""
    return (fn.__name__, x.device.type, x.dtype) not in _FAILED


def call(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any) -> torch.Tensor | None:
    """fn(x, *args) compiled; None where compiling it fails (then, one warning, and None
    from then on for x's device and dtype without trying again). Under a torch dispatch mode
    (a FlopCounterMode, a debugging mode) fn runs as written: dynamo cannot compile there, and
    would never try that function again."""
    if not works(fn, x):
        return None
    if is_in_torch_dispatch_mode():
        return fn(x, *args)
    # detached: dynamo guards a view's base too, which would compile fn again for each kind
    # of base a view comes from (and run it uncompiled past torch's recompile limit)
    given = [a.detach() if isinstance(a, torch.Tensor) else a for a in (x, *args)]
    try:
        return compiled(fn, x.dtype, x.dim())(*given)
    except Exception as err:  # noqa: BLE001 (any compiler failure: eager ops instead)
        _FAILED.add((fn.__name__, x.device.type, x.dtype))
        warnings.warn(
            f"gradscope: compiling the fused statistics ({fn.__name__}) for {x.dtype} on "
            f"{x.device.type} failed ({type(err).__name__}: {str(err).strip()[:200]}); "
            "recording with eager torch ops there, which read each tensor several times. "
            "GRADSCOPE_FUSED=0 silences this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def rows(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any) -> torch.Tensor:
    """fn(x, *args) compiled, or as written (eager) where compiling failed."""
    out = call(fn, x, *args)
    return fn(x, *args) if out is None else out


class FusedCalls:
    """A recorder's per-call statistics (module outputs, output gradients) through the
    compiled functions, on the devices they are used: None where they are not used (another
    device, an integer or empty tensor, a failed compile), and the caller's eager ops
    compute them."""

    def __init__(self) -> None:
        self.devices = devices_from_env()

    def _takes(self, x: torch.Tensor) -> bool:
        return used_on(self.devices, x) and x.is_floating_point() and x.numel() > 0

    def moments(self, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor | None:
        """moments() of x, compiled."""
        return call(moments, x, *shape) if self._takes(x) else None

    def sample_norms(self, g: torch.Tensor) -> torch.Tensor | None:
        """sample_norms() of g, compiled."""
        return call(sample_norms, g) if self._takes(g) else None
