"""The step clock of gradscope.Recorder: which steps are recorded, what its hooks do in a
recorded step, and how a step closes (the optimizer's hooks or rec.step()) and is collected."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradscope.analysis import OnlineDiagnosis
from gradscope.recorder import hooks
from gradscope.recorder.capture import StepCapture
from gradscope.recorder.compiled import GraphTaps
from gradscope.recorder.deferred import DeferredRows
from gradscope.recorder.errors import NonfiniteEvent, RecorderError
from gradscope.recorder.optimizers import OptimizerHooks
from gradscope.recorder.params import ParamReader
from gradscope.recorder.reduce import nonfinite_origins
from gradscope.recorder.stats.fields import GRAD, OUTPUT


class StepClock:
    """The step side of gradscope.Recorder (its state is made in Recorder.__init__)."""

    every: int | Callable[[int], bool]
    grad_scaler: Any
    geometry: bool
    on_verdict: Callable[[Any], object] | None
    nonfinite: list[NonfiniteEvent]
    optimizer: torch.optim.Optimizer | None
    _capture: StepCapture
    _rows: DeferredRows
    _params: ParamReader
    _outputs: hooks.OutputHooks | GraphTaps | None
    _optimizer_hooks: OptimizerHooks | None
    _summary: dict[str, Any]
    _online: OnlineDiagnosis | None
    _live: Any
    _step: int
    _recording: bool
    _stale: bool

    model: nn.Module | None
    _replan: Callable[[], None]  # Recorder: follows model surgery
    _describe_spill: Callable[[], None]  # Recorder: spill.json
    to_frame: Callable[[], Any]  # RecorderResults

    @property
    def attached(self) -> bool:
        return self.model is not None

    @property
    def recording(self) -> bool:
        """Whether the step now being run is recorded."""
        return self._recording

    @property
    def step_index(self) -> int:
        """The index of the step now being run (0 before the first update)."""
        return self._step

    def record_now(self) -> None:
        """Records the current step even where `every` skips it.

        Hooks are armed from now on: statistics of a forward pass already run in this step
        are not recovered, so call this before the forward (the training loop reruns the
        forward of a step whose loss came out non-finite).
        """
        if not self.attached:
            raise RecorderError("record_now() on a detached recorder; attach() it first")
        self._capture.reset()
        self._set_recording(True)

    def _set_recording(self, on: bool) -> None:
        """Arms the forward hooks for a recorded step and removes them after it."""
        self._recording = on
        if self._outputs is not None:
            self._outputs.arm(on)

    def _should_record(self, step: int) -> bool:
        if callable(self.every):
            return bool(self.every(step))
        return step % int(self.every) == 0

    # -- hooks -----------------------------------------------------------------------------

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        if self._recording and torch.is_grad_enabled():
            self._capture.scale(self.grad_scaler)

    def _on_output_grad(self, label: str, grad: torch.Tensor) -> None:
        if self._recording:
            self._capture.grad(label, grad)

    def _before_update(self) -> None:
        if self._stale:  # the parameters this update steps are read from the new plan
            self._replan()
        hooks = self._optimizer_hooks
        if hooks is not None and self.optimizer is not hooks.optimizer:  # found, or made anew
            self.optimizer = hooks.optimizer
            self._summary["optimizer"] = type(hooks.optimizer).__name__
            self._describe_spill()  # a folder read mid-run names the optimizer it found
        if self._recording:
            self._capture.params = self._params.read(snapshot=True)

    def step(self) -> None:
        """Closes a step in loops without an optimizer: reads parameter gradients now.

        Where no optimizer was given, calling step() makes the loop's own steps the clock:
        optimizers are no longer looked for (one already found is let go, with a warning).
        """
        if not self.attached:
            raise RecorderError("step() on a detached recorder; attach() it first")
        hooks_ = self._optimizer_hooks
        if hooks_ is not None and hooks_.searching:
            if self.optimizer is not None:
                warnings.warn(
                    "gradscope: rec.step() closes the steps from now on; the optimizer found "
                    "stepping the model is no longer followed (call one or the other)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            hooks_.remove()
            self._optimizer_hooks, self.optimizer = None, None
        if self.optimizer is not None:
            raise RecorderError("an optimizer is attached: its step() closes each step")
        if self._stale:
            self._replan()
        if self._recording:
            self._capture.params = self._params.read(snapshot=False)
        self._close_step()

    def log_scalar(self, stat: str, value: torch.Tensor | float) -> None:
        """Logs a scalar (the loss, a pre-clip norm) for the current step, if it is recorded."""
        if self._recording:
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            self._capture.scalars.append((stat, value))

    # -- step bookkeeping ------------------------------------------------------------------

    def _close_step(self) -> None:
        if self._recording:
            if not self._capture.empty():
                self._collect(self._step)
                store = self._rows.store
                if store.spill_to is not None and store.step_recorded():  # by steps or time
                    self._rows.settled().spill()
                if self._live is not None:
                    self._live.on_step(self)
            self._capture.reset()
        if self._stale:
            self._replan()
        # (a step not recorded captured nothing: its hooks were off, and capture was reset
        # when the last recorded step closed; so an unrecorded step costs a few calls here)
        self._step += 1
        record = self._should_record(self._step)
        if record or self._recording:
            self._set_recording(record)

    def _collect(self, step: int) -> None:
        """One step's statistics: to the host, per layer, merged over ranks, into rows."""
        read = self._capture.params
        updates = geometry = None
        if read is not None:
            read, updates, geometry = self._params.after_update(read, self.optimizer, self.geometry)
            self._capture.params = read
        scaler = self.grad_scaler
        scale = None
        if scaler is not None and scaler.is_enabled():
            # the scale as a device tensor, read with the step's transfer (float() of it would
            # wait for the device); a host number before the scaler's first scale()
            scale = scaler._get_scale_async()
            if scale is None:
                scale = float(scaler.get_scale())
        # the transfer is read when it has arrived (this step on the CPU, a later one on a
        # device): _finish then makes the step's rows
        self._rows.pend(step, self._capture.collect(updates, scale, geometry), self._finish)

    def _finish(self, step: int, tables: Any, scales: Any) -> None:
        """A closed step's statistics, read on the host: origins, rows, online diagnosis."""
        origins = nonfinite_origins(tables)
        for phase, layer in origins.items():
            self.nonfinite.append(NonfiniteEvent(step, str(phase), layer))
        # rows are made later, for many steps at once (deferred.py); the online diagnosis
        # reads the step's parameter sums as they are (analysis/online.py)
        self._rows.add(step, tables, scales, origins)
        online, on_verdict = self._online, self.on_verdict
        values, read = tables.param_values, tables.params
        if (
            online is not None
            and on_verdict is not None
            and values is not None
            and read is not None
        ):
            ndims = [self._params.params[i][1].ndim for i in read.present]
            bad = (
                values.nonfinite.sum()
                + tables.output_stats[:, OUTPUT.index("nonfinite")].sum()
                + tables.grad_stats[:, GRAD.index("nonfinite_samples")].sum()
            )
            numbers = (values.grad_sumsq, values.param_sumsq, tables.update_sumsq, ndims)
            for verdict in online.update_numbers(step, *numbers, float(bad), self.to_frame):
                on_verdict(verdict)
