"""The Recorder's front: settings, attach/detach and re-planning; and `watch` (the step clock:
steps.py; what it gives back: results.py).

How a recorded step flows through the package, what is exact and what is held: see the
package docstring (gradscope/recorder/__init__.py).
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.utils.hooks import RemovableHandle

from gradscope.analysis import OnlineDiagnosis
from gradscope.recorder import distributed, hooks
from gradscope.recorder.capture import StepCapture, band
from gradscope.recorder.compiled import GraphTaps, compiled_parts, make_dynamo_see_hooks
from gradscope.recorder.deferred import DeferredRows
from gradscope.recorder.errors import NonfiniteEvent, RecorderError, why_nothing_recorded
from gradscope.recorder.optimizers import OptimizerHooks
from gradscope.recorder.params import ParamReader, same
from gradscope.recorder.plan import plan_model
from gradscope.recorder.reduce import Reducer
from gradscope.recorder.results import RecorderResults
from gradscope.recorder.rows import RowStore
from gradscope.recorder.steps import StepClock


class Recorder(StepClock, RecorderResults):
    """Records gradient-flow statistics of one model; see gradscope.schema for the frame.

    Args:
        every: record every n-th step (an int >= 1) or the steps where `every(step)` is true.
        include: module fqn globs or a predicate `(fqn, module) -> bool` selecting any module,
            leaf or composite; default every leaf and every block (see the module docstring).
        exclude: the same, removing modules (and their parameters) from the selection.
        activations: record forward statistics of module outputs (default: yes; on compiled
            models too: the statistics are computed inside the compiled graphs).
        activation_grads: record gradients w.r.t. module outputs (default: yes).
        allow_multiple: allow another recorder on the same model.
        sync: merge statistics over ranks (default: yes for DDP and FSDP2 models in an
            initialized process group). Rank 0 keeps the rows; other ranks keep none.
        grad_scaler: the torch.amp.GradScaler of the loop, if any: output gradients are then
            divided by the scale their backward was made with (parameter gradients need
            nothing: the scaler unscales them before the optimizer steps). A step the scaler
            skips (inf/NaN found) runs no optimizer hook; its statistics merge into the next
            recorded step.
        spill_to: a directory for long runs: rows go to Parquet parts there instead of
            accumulating in memory (it must not hold another recording's parts). A killed
            job's folder reads back with gradscope.load_run (and `gradscope report`); a part
            that cannot be written (a full disk) is warned about once and its rows stay
            in memory.
        spill_rows: how many rows are held in memory before they are written out.
        spill_steps, spill_seconds: the held rows are also written out after this many
            recorded steps or this many seconds, whichever comes first (so a kill loses
            at most the last few seconds).
        on_verdict: called with each new warning or error (gradscope.Verdict) as training
            goes, e.g. to stop or checkpoint (gradscope.analysis.online): each recorded step's
            update ratio, step size, gradient norm and inf/NaN count are checked at once
            against their running baselines (divergence, spikes, non-finite values); the
            whole-run rules run on the recording so far within a small time budget. A root
            cause is reported once, its symptoms not at all. About 16 us a recorded step.
        diagnose_window: recorded steps OnlineDiagnosis.update_rows looks back over (the
            recorder itself gives the whole-run rules the whole recording).
        geometry: with an optimizer, also the update's cosine with the negative gradient, its
            step size and Adam's second-moment norm (one more pass over each parameter).
        live: show the newest step while training (gradscope.integrations.live): True every
            few seconds, a number of seconds, or a LiveView; a panel in Jupyter, a line of
            headlines in a terminal.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with watch(model, optimizer=opt) as rec:
        ...     model(torch.randn(8, 4)).sum().backward()
        ...     opt.step()
        >>> sorted(rec.to_frame()["kind"].unique())[:2]
        ['activation', 'activation_grad']
    """

    def __init__(
        self,
        every: int | Callable[[int], bool] = 1,
        include: hooks.Selector = None,
        exclude: hooks.Selector = None,
        activations: bool | None = None,
        activation_grads: bool | None = None,
        allow_multiple: bool = False,
        sync: bool | None = None,
        grad_scaler: Any = None,
        spill_to: str | os.PathLike[str] | None = None,
        spill_rows: int = 200_000,
        spill_steps: int = 1000,
        spill_seconds: float = 5.0,
        on_verdict: Callable[[Any], object] | None = None,
        diagnose_window: int = 32,
        geometry: bool = True,
        live: Any = False,
    ) -> None:
        if not callable(every) and (
            isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1
        ):
            raise ValueError(
                f"every must be an integer >= 1 or a callable step -> bool, got {every!r}"
            )
        self.every = every
        self.include = include
        self.exclude = exclude
        self.activations = activations
        self.activation_grads = activation_grads
        self.allow_multiple = allow_multiple
        self.sync = sync
        self.grad_scaler = grad_scaler
        self.nonfinite: list[NonfiniteEvent] = []
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._rows = DeferredRows(
            RowStore(
                Path(spill_to) if spill_to is not None else None,
                spill_rows,
                spill_steps,
                spill_seconds,
            )
        )
        self._capture = StepCapture()
        self._handles: list[RemovableHandle] = []
        self._outputs: hooks.OutputHooks | GraphTaps | None = None
        self._watched_root: nn.Module | None = None
        self._params = ParamReader([])
        self._sync = False
        self._step = 0
        self._attach_step = 0
        self._recording = False
        self._optimizer_hooks: OptimizerHooks | None = None
        self._summary: dict[str, Any] = {}
        self._planned: tuple[nn.Module, str] | None = None  # the unwrapped model, its wrapper
        self._module_ids: set[int] = set()  # of every module in it, to see it change
        self._stale = False  # modules or parameters changed since the plan
        self._noted: set[str] = set()  # notes given once
        self.on_verdict = on_verdict
        self.geometry = geometry
        self._online = OnlineDiagnosis(diagnose_window) if on_verdict is not None else None
        self._live = None
        if live is not None and live is not False:
            from gradscope.integrations.live import live_view  # only when asked for

            self._live = live_view(live)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def spill_to(self) -> Path | None:
        return self._rows.store.spill_to

    @property
    def rows_held(self) -> int:
        """Rows held in memory (not yet spilled)."""
        return self._rows.rows_held

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Recorder:
        """Registers the hooks; every registration is kept as a removable handle."""
        if self.attached:
            raise RecorderError("this recorder is already attached; detach() it first")
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        if not self.allow_multiple and hooks.is_watched(model):
            raise RecorderError(
                "another gradscope Recorder is attached to this model; detach it first, "
                "or pass allow_multiple=True"
            )
        self._rows.store.check_spill_dir()
        outer = model
        model, kind = distributed.unwrap(model)
        compiled = kind == "compiled" or compiled_parts(model)
        record_acts = self.activations is not False
        record_grads = self.activation_grads is not False
        plan = plan_model(model, kind, self.include, self.exclude, self.sync)
        if optimizer is not None and not plan.params:
            raise RecorderError(
                "the model has no trainable parameters, so there is nothing for the optimizer "
                "to update; watch it without an optimizer to record activations only"
            )
        modules = self._take_plan(plan)
        if compiled and modules and (record_acts or record_grads):
            # hooks traced into the compiled graphs (see recorder/compiled.py)
            make_dynamo_see_hooks(outer)
            device = plan.params[0][1].device if plan.params else torch.device("cpu")
            scaler = self.grad_scaler is not None and self.grad_scaler.is_enabled()
            taps = GraphTaps(
                modules,
                device,
                record_acts,
                record_grads,
                self._capture.graph_backward if scaler else None,
            )
            self._capture.graph = self._outputs = taps
        else:
            self._outputs = hooks.OutputHooks(
                modules,
                self._capture.output if record_acts else None,
                self._on_output_grad if record_grads else None,
            )
        self.model, self.optimizer = outer, optimizer
        self._planned = (model, kind)
        self._module_ids = {id(m) for m in model.modules()}
        self._stale = False
        self._handles += [
            register_module_module_registration_hook(self._on_registration),
            register_module_parameter_registration_hook(self._on_registration),
        ]
        self._summary = {
            "class": type(model).__name__,
            "wrapper": kind,
            "parameters": sum(p.numel() for p in model.parameters()),
            "recorded_parameters": len(plan.params),
            "watched_modules": len(modules),
            "blocks": len(plan.block_index),
            # module classes by fqn: figures tell activation functions from pass-through
            "types": {label: type(module).__name__ for label, module, _ in modules},
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "frozen": plan.frozen,
        }
        self._describe_spill()
        hooks.register(outer, self)
        self._watched_root = outer
        if self.grad_scaler is not None and self.grad_scaler.is_enabled() and record_grads:
            self._handles.append(outer.register_forward_pre_hook(self._on_root_forward))
        # the given optimizer, or any, wherever it is made (in trainer.fit(), Trainer.train())
        self._optimizer_hooks = OptimizerHooks(
            optimizer, self._trainable, self._before_update, self._close_step
        )
        self._attach_step = self._step
        self._set_recording(self._should_record(self._step))
        return self

    def _describe_spill(self) -> None:
        """Writes what a spill folder's parts are of (model, settings) as spill.json, so that
        the folder of a killed job reads back as a run (gradscope.load_run)."""
        folder = self.spill_to
        if folder is None:
            return
        from gradscope.files import atomic_write_text, describe

        text = json.dumps({"model": self._summary, "recorder": self.settings()}, default=str)
        try:
            atomic_write_text(folder / "spill.json", text)
        except OSError as e:
            warnings.warn(
                f"gradscope: cannot write {folder / 'spill.json'} ({describe(e)})",
                RuntimeWarning,
                stacklevel=3,
            )

    def _take_plan(self, plan: Any) -> list[tuple[str, nn.Module, tuple[float, float] | None]]:
        """Readers and rows for a plan of the model; its modules with their bands."""
        # a parameter (or its gradient) as this rank holds it: the local shard of an FSDP2
        # DTensor, else the tensor itself (decided here, so plain models pay nothing)
        self._params = ParamReader(plan.params, distributed.local if plan.dtensors else same)
        self._sync = plan.sync
        self._capture.channel_first = plan.channel_first
        self._rows.reset(Reducer(plan.block_index), plan.layout, plan.sync)
        return [(label, module, band(module)) for label, module in plan.modules]

    def _trainable(self) -> list[torch.Tensor]:
        """The recorded parameters now (a new optimizer is matched against them): after
        model surgery, those of the new plan."""
        if self._stale:
            self._replan()
        return [p for _, p in self._params.params]

    def _on_registration(self, module: nn.Module, name: str, value: Any) -> None:
        # torch's global registration hooks: any module anywhere; ours are a set lookup
        if id(module) in self._module_ids:
            self._stale = True

    def _replan(self) -> None:
        """Follows modules or parameters added or replaced after attach (eager models); other
        models are warned about once."""
        self._stale = False
        planned = self._planned
        if planned is None:
            return
        model, kind = planned
        self._module_ids = {id(m) for m in model.modules()}
        if kind != "eager" or self._sync or not isinstance(self._outputs, hooks.OutputHooks):
            if "replan" not in self._noted:
                self._noted.add("replan")
                warnings.warn(
                    f"gradscope: modules or parameters of this {kind} model changed after "
                    "attach; they are not recorded until you detach() and attach() again",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        plan = plan_model(model, kind, self.include, self.exclude, self.sync)
        modules = self._take_plan(plan)
        outputs = self._outputs
        record_acts, record_grads = outputs.records
        outputs.arm(False)
        self._outputs = hooks.OutputHooks(
            modules,
            self._capture.output if record_acts else None,
            self._on_output_grad if record_grads else None,
        )
        self._outputs.arm(self._recording)
        before = (self._summary.get("recorded_parameters"), self._summary.get("watched_modules"))
        self._summary["recorded_parameters"] = len(plan.params)
        self._summary["watched_modules"] = len(modules)
        if "replan" not in self._noted:
            self._noted.add("replan")
            warnings.warn(
                f"gradscope: the model's modules or parameters changed after attach "
                f"({before[0]} -> {len(plan.params)} parameters, {before[1]} -> "
                f"{len(modules)} modules recorded); recorded as they are from step "
                f"{self._step} on (noted once)",
                RuntimeWarning,
                stacklevel=3,
            )

    def detach(self) -> None:
        """Removes every hook and buffer; the recorded rows stay. Safe to call twice.

        Warns (RuntimeWarning) when nothing at all has been recorded, saying why.
        """
        if self.attached and self._rows.empty:
            warnings.warn(
                "gradscope: nothing was recorded: "
                + why_nothing_recorded(
                    self._step - self._attach_step,
                    bool(self._params.params),
                    any(self._should_record(s) for s in range(self._attach_step, self._step)),
                    self.every,
                ),
                RuntimeWarning,
                stacklevel=2,
            )
        self._set_recording(False)
        if self._optimizer_hooks is not None:
            self._optimizer_hooks.remove()
            self._optimizer_hooks = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._watched_root is not None:
            hooks.unregister(self._watched_root, self)
            self._watched_root = None
        if isinstance(self._outputs, GraphTaps):
            self._outputs.remove()
            self._capture.graph = None
        self._capture.reset()
        self._capture.backends.torch.clear()
        if self._live is not None and not self._rows.empty:
            self._live.close(self)  # the final state stays on screen
        self._rows.settled().spill()
        self.model, self.optimizer = None, None
        self._params = ParamReader([])
        self._outputs = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    every: int | Callable[[int], bool] = 1,
    **kwargs: Any,
) -> Recorder:
    """Creates a Recorder and attaches it; use as a context manager to detach on exit.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with watch(model, optimizer=opt, every=1) as rec:
        ...     model(torch.randn(5, 3)).sum().backward()
        ...     opt.step()
        >>> list(rec.to_frame().columns)
        ['step', 'layer', 'kind', 'stat', 'value']
    """
    return Recorder(every=every, **kwargs).attach(model, optimizer)
