"""A module output's statistics as one compiled function (torch.compile; Triton kernels on a
GPU): the eager torch ops (torch_ops.activation_moments) read an output several times and
write a work buffer three times its size, which on a GPU makes recording memory-bound; fused,
the output is read about twice (one pass for the whole-tensor reductions, one for the
per-unit counts) and nothing of its size is written.

The same values as activation_moments, in its MOMENTS order, as one float64 tensor of 7, so
that the step's transfer and its decoding do not change; the sum is accumulated in float64
(the eager sum uses the output's dtype below 2**24 values). Compiled once per dtype and
layout, with dynamic sizes (`fullgraph`: no graph break, so nothing in it reads a value on
the host). Used by default for CUDA tensors; GRADSCOPE_FUSED=1 uses it on every device (the
CPU included, for checks), GRADSCOPE_FUSED=0 never. Where compiling fails (no Triton, an old
GPU), one warning, and the eager ops from then on.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

DEFAULT_DEVICES = frozenset({"cuda"})


def moments(x: torch.Tensor, outer: int, units: int, inner: int) -> torch.Tensor:
    """torch_ops.MOMENTS of x (seen as outer x units x inner), as one float64 tensor."""
    x = x.detach()
    wide = x.to(torch.float64)
    number = x == x  # not NaN
    largest = torch.where(number, x, -math.inf).amax().to(torch.float64)
    smallest = torch.where(number, x, math.inf).amin().to(torch.float64)
    per_unit = x.reshape(outer, units, inner).ne(0).sum(dim=(0, 2))
    return torch.stack(
        [
            wide.sum(),
            (wide * wide).sum().sqrt(),
            x.ne(0).sum().to(torch.float64),
            (x - x).ne(0).sum().to(torch.float64),  # inf - inf and NaN - NaN are NaN
            per_unit.ne(0).sum().to(torch.float64),
            largest,
            -smallest,
        ]
    )


def devices_from_env() -> frozenset[str] | None:
    """The device types the fused statistics are used on (None: every one), from
    GRADSCOPE_FUSED ("1": all, "0": none, else DEFAULT_DEVICES)."""
    setting = os.environ.get("GRADSCOPE_FUSED", "").strip()
    if setting == "1":
        return None
    if setting == "0":
        return frozenset()
    return DEFAULT_DEVICES


@functools.cache
def compiled() -> Callable[..., Any]:
    """moments() compiled (once per process: every recorder shares its graphs)."""
    return torch.compile(moments, dynamic=True)


class FusedMoments:
    """moments() compiled, for the devices it is used on; None where it is not used."""

    def __init__(self) -> None:
        self.devices = devices_from_env()
        self._failed: set[tuple[str, torch.dtype]] = set()

    def takes(self, x: torch.Tensor) -> bool:
        device = x.device.type
        return (
            (self.devices is None or device in self.devices)
            and x.is_floating_point()
            and (device, x.dtype) not in self._failed
            and x.numel() > 0
        )

    def __call__(self, x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor | None:
        """moments() of x, compiled; None where compiling failed (the caller computes them
        eagerly)."""
        try:
            return compiled()(x, *shape)
        except Exception as err:  # noqa: BLE001 (any compiler failure: the eager ops instead)
            self._failed.add((x.device.type, x.dtype))
            warnings.warn(
                f"gradscope: compiling the fused statistics for {x.dtype} on {x.device.type} "
                f"failed ({type(err).__name__}: {str(err).strip()[:200]}); recording with "
                "eager torch ops there, which read each output several times. "
                "GRADSCOPE_FUSED=0 silences this.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
