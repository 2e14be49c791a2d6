"""The recorded parameters of one attach, read twice in each recorded step.

Before the update (the optimizer's pre-hook, or `rec.step()` in loops without one): each
present gradient's sum of squares, max and non-finite count and the parameter's sum of
squares, and with `snapshot` a pre-update copy. After it: the update's sum of squares
(parameter minus copy), with `geometry` its dot product with the gradient and the optimizer's
second-moment sums. The values stay on the device until the step's one transfer (capture.py);
`recount` then redoes in float64 the torch-op sums that may have lost squares. Which backend
computes them (C kernels or torch ops) is chosen in backends.param_stats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.recorder.backends import param_stats, recount_params, second_moments
from gradscope.recorder.capture import ParamRead, Part, Tables, strided

Local = Callable[[torch.Tensor], torch.Tensor]


def same(t: torch.Tensor) -> torch.Tensor:
    return t


class ParamReader:
    """Reads the parameters `params` (fqn, parameter) as this rank holds them: `local` maps
    an FSDP2 DTensor to its local shard (statistics of shards merge over ranks later)."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], local: Local = same) -> None:
        self.params = params
        self._local = local
        self._stats: Any = None  # the backend's buffers, made at the first read
        # after the update: the present parameters and their gradients, for the recount
        self._after: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def read(self, snapshot: bool) -> ParamRead | None:
        """Before the update; None where no parameter has a gradient."""
        local = self._local
        present, grads, tensors = [], [], []
        for i, (_, p) in enumerate(self.params):
            if p.grad is not None:
                present.append(i)
                grads.append(strided(local(p.grad)))
                tensors.append(local(p))
        if not present:
            return None
        if self._stats is not None and not self._stats.fits(present, tensors):
            self._stats = None  # parameters resized, retyped or moved since: new buffers
        if self._stats is None:
            self._stats = param_stats([local(p) for _, p in self.params])
        with torch.no_grad():
            values = self._stats.read(present, grads, tensors, snapshot)
        return ParamRead(present, snapshot, values)

    def after_update(
        self, read: ParamRead, optimizer: Any, geometry: bool
    ) -> tuple[Part | None, tuple[Part, Part] | None]:
        """The update's sums of squares (None without a snapshot) and, with `geometry`, its
        dot products with the gradients and the second-moment sums."""
        # read again after the step: a DTensor's local shard may be a new tensor
        tensors = [self._local(self.params[i][1]) for i in read.present]
        grads = [
            strided(self._local(self.params[i][1].grad))  # type: ignore[arg-type]
            for i in read.present
        ]
        self._after = (tensors, grads)
        if not read.snapshot:
            return None, None
        with torch.no_grad():
            updates = self._stats.updates(read.present, tensors, grads if geometry else None)
        if updates.ndim != 2:
            return updates, None
        return updates[0], (updates[1], self._second_moments(read.present, optimizer))

    def recount(self, read: ParamRead, tables: Tables) -> None:
        """Exact float64 sums where the torch ops' may have under- or overflowed, in place."""
        tensors, grads = self._after
        recount_params(
            self._stats, read.present, tensors, grads, tables.param_values, tables.update_sumsq
        )
        self._after = ([], [])

    def _second_moments(self, present: list[int], optimizer: Any) -> Part:
        """Adam-like optimizers' second-moment states of the present parameters."""
        state = getattr(optimizer, "state", {})
        second = [state.get(self.params[i][1], {}).get("exp_avg_sq") for i in present]
        local = [self._local(s) if isinstance(s, torch.Tensor) else None for s in second]
        with torch.no_grad():
            return second_moments(local)
