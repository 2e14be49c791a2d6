"""The recorded parameters of one attach, read in each recorded step.

With an optimizer, two reads: before the update (the optimizer's pre-hook) a copy of each
parameter that has a gradient; after it, in one pass over gradient, copy and parameter, each
gradient's sum of squares, max and non-finite count, the parameter's sum of squares before
the update, the update's sum of squares (parameter minus copy) and, with `geometry`, its dot
product with the gradient, plus the optimizer's second-moment sums. Gradients are the ones
present before the update (an optimizer that drops them does not lose them). An optimizer
that changes gradients in place during its step (their version counters move) would make
the pass after it read the changed values: the first recorded step and, once such a change
is seen, every later one also read the gradients before the update (one more pass over
them), and a warning says so. In loops without an optimizer (`rec.step()`), one read of
gradients and parameters, with no update.

Values stay on the device until the step's one transfer (capture.py); the host then takes
the float64 recounts of the eager torch-op sums that may have lost squares (computed on the
device beside them: backends.exact_param_values; the fused passes used on GPUs sum in
float64 and need none). Which backend computes them (C
kernels or torch ops) is chosen in stats/backends.py (choose).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.recorder.capture import ParamRead, Part, strided, version
from gradscope.recorder.stats.backends import param_stats, second_moments

Local = Callable[[torch.Tensor], torch.Tensor]
_STRIDED = torch.strided


def same(t: torch.Tensor) -> torch.Tensor:
    return t


class ParamReader:
    """Reads the parameters `params` (fqn, parameter) as this rank holds them: `local` maps
    an FSDP2 DTensor to its local shard (statistics of shards merge over ranks later)."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], local: Local = same) -> None:
        self.params = params
        self._local = local
        self._tensors: list[torch.Tensor] = [p for _, p in params]
        self._ids = [id(p) for p in self._tensors]
        self._all = list(range(len(params)))
        self._stats: Any = None  # the backend's buffers, made at the first read
        self._grads: list[torch.Tensor] = []  # the gradients read before the update
        # whether gradients are also read before the update (None: not known yet, so they
        # are), and their version counters then
        self._grads_before: bool | None = None
        self._versions: list[int | None] = []

    def read(self, snapshot: bool) -> ParamRead | None:
        """Before the update (`snapshot`: one will be measured; else the values now); None
        where no parameter has a gradient."""
        local = self._local
        tensors = self._tensors
        found = [p.grad for p in tensors]
        if local is same and all(g is not None and g.layout is _STRIDED for g in found):
            present = self._all  # the usual step: every parameter has a dense gradient
            grads: list[torch.Tensor] = found  # type: ignore[assignment]
        else:
            present = [i for i, g in enumerate(found) if g is not None]
            grads = [strided(local(found[i])) for i in present]  # type: ignore[arg-type]
            tensors = [local(tensors[i]) for i in present]
        if not present:
            return None
        if self._stats is not None and not self._stats.fits(present, tensors):
            self._stats = None  # parameters resized, retyped or moved since: new buffers
        if self._stats is None:
            self._stats = param_stats([local(p) for _, p in self.params])
        self._grads = grads
        # (the backends read parameters without recording autograd graphs: the C kernels make
        # none, and FlatStats's methods run under no_grad)
        numel = None if self._stats.exact else self._stats.numel[present]
        if not snapshot:
            return ParamRead(present, False, self._stats.read(present, grads, tensors), numel)
        # the values come with the update, unless the gradients must be read now too (the
        # torch-op backend reads them before the update anyway)
        now = self._grads_before is not False and self._stats.grads_after
        values = self._stats.read(present, grads, tensors) if now else None
        self._stats.snapshot(present, grads, tensors)
        if self._watching_gradients():
            self._versions = [version(g) for g in grads]
        return ParamRead(present, True, values, numel)

    def after_update(
        self, read: ParamRead, optimizer: Any, geometry: bool
    ) -> tuple[ParamRead, Part | None, tuple[Part, Part] | None]:
        """The read with its values, the update's sums of squares (None without a snapshot)
        and, with `geometry`, its dot products with the gradients and the second-moment
        sums."""
        # read again after the step: a DTensor's local shard may be a new tensor
        params, local = self.params, self._local
        if read.present is self._all and local is same:
            tensors = self._tensors
        else:
            tensors = [local(params[i][1]) for i in read.present]
        if not read.snapshot:
            self._grads = []
            return read, None, None
        values, updates, dots = self._stats.after(tensors, geometry)
        if self._watching_gradients():
            self._check_gradients_kept()
        self._grads = []
        before = read.values
        if before is not None:  # the gradients' statistics as read before the update
            values = values._replace(
                grad_sumsq=before.grad_sumsq,
                grad_max=before.grad_max,
                nonfinite=before.nonfinite,
                grad_norm=before.grad_norm,
            )
        read = read._replace(values=values)
        if dots is None:
            return read, updates, None
        return read, updates, (dots, self._second_moments(read.present, optimizer))

    def _watching_gradients(self) -> bool:
        """Whether the gradients' version counters are checked around the update: where the
        pass after it reads them, until a change has been seen (then they are read before)."""
        return bool(self._stats.grads_after) and not self._grads_before

    def _check_gradients_kept(self) -> None:
        """Whether the optimizer left the gradients as they were: if not, gradients are read
        before the update from now on."""
        changed = [version(g) for g in self._grads] != self._versions
        if changed:
            if self._grads_before is False:  # read after the change at this step
                warnings.warn(
                    "gradscope: the optimizer changed gradients in place during its step; "
                    "gradient statistics of this step are of the changed gradients, and "
                    "from the next recorded step on they are read before the update",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._grads_before = True
        elif self._grads_before is None:
            self._grads_before = False  # unchanged: the pass after the update reads them

    def _second_moments(self, present: list[int], optimizer: Any) -> Part:
        """Adam-like optimizers' second-moment states of the present parameters."""
        state = getattr(optimizer, "state", {})
        # by id, from one walk over the state: looking each parameter up hashes it through
        # Tensor.__hash__, a Python call (~0.3 us a parameter)
        by_id = {id(p): s.get("exp_avg_sq") for p, s in state.items() if isinstance(s, dict)}
        ids = self._ids
        second = [by_id.get(ids[i]) for i in present]
        local = [self._local(s) if isinstance(s, torch.Tensor) else None for s in second]
        return second_moments(local)
