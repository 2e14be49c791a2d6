"""Attaches hooks to any nn.Module and records per-layer gradient and activation statistics.

The frame a Recorder produces is long form, with columns exactly
``step, layer, kind, stat, value``. Kinds and stats:

- ``param_grad`` (layer = parameter fqn, e.g. ``blocks.3.fc1.weight``), read when the optimizer
  is about to step, i.e. the gradient the update uses (after accumulation, clipping, AMP
  unscaling, all-reduce); without an optimizer, at ``rec.step()``:
  ``norm`` (L2, float64), ``max_abs``, ``nonfinite`` (count of inf/NaN entries).
  One extra row ``layer="*"``, ``stat="norm"``: the total L2 norm over all recorded parameters.
- ``param``: ``norm`` of the parameter before the update, ``ndim`` (2 for a weight matrix).
- ``update`` (only with an optimizer): ``norm`` of the update the optimizer applied
  (parameter after the step minus before), ``ratio`` = update norm / parameter norm.
- ``activation`` (layer = module fqn; ``fqn[i]`` / ``fqn[key]`` for tuple or dict outputs):
  ``mean``, ``std``, ``rms``, ``zero_frac`` (exact zeros: dead ReLU outputs), ``min``,
  ``max``, ``nonfinite``; ``saturated_frac`` for bounded activations (tanh, sigmoid,
  hardtanh, ...): outputs within 1% of a bound's magnitude of that bound.
- ``activation_grad``: gradient w.r.t. the module's output (the back-propagated signal):
  ``norm`` over the whole batch, ``sample_norm`` (mean over samples, indexed by the first
  dimension, of each sample's norm), ``nonfinite`` (samples whose gradient holds inf/NaN).
- ``nonfinite_origin``: on a step with a non-finite value, ``stat="forward"`` names the first
  module in forward order whose output became non-finite, ``stat="backward"`` the first in
  backward order whose gradient did (value 1).
- ``scalar`` (layer ``"*"``): values logged with ``Recorder.log_scalar`` (loss, pre-clip norm).

Norms are exact: float64 accumulation, equal to ``torch.linalg.vector_norm(t.double())``.
Statistics of all calls of a module within one step (shared weights, micro-batches) are
merged from additive moments. Forward passes under ``torch.no_grad()`` (evaluation) are
skipped. Statistics stay on the device until a recorded step closes, then move to the host
in one transfer.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradscope import stats

COLUMNS = ["step", "layer", "kind", "stat", "value"]
Selector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


@dataclass(frozen=True)
class NonfiniteEvent:
    """Where a non-finite value first appeared in a step."""

    step: int
    phase: str  # "forward" (module output) or "backward" (gradient w.r.t. the output)
    layer: str


class RecorderError(RuntimeError):
    """Misuse of a Recorder: a second recorder on a model, a missing optimizer, ..."""


def _matches(selector: Selector, fqn: str, module: nn.Module) -> bool:
    if selector is None:
        return False
    if callable(selector):
        return bool(selector(fqn, module))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    return any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


def _tensor_outputs(output: Any, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    """Each floating-point tensor in a module's output, labelled fqn, fqn[i] or fqn[key]."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield prefix, output
    elif isinstance(output, tuple | list):
        for i, item in enumerate(output):
            yield from _tensor_outputs(item, f"{prefix}[{i}]")
    elif isinstance(output, Mapping):
        for key, item in output.items():
            yield from _tensor_outputs(item, f"{prefix}[{key}]")


class Recorder:
    """Records gradient-flow statistics of one model; see the module docstring for the schema.

    Args:
        every: record every n-th step (an int >= 1) or the steps where `every(step)` is true.
        include: module fqn globs or a predicate `(fqn, module) -> bool`; default all leaves.
        exclude: the same, removing modules (and their parameters) from the selection.
        activations: record forward statistics of module outputs.
        activation_grads: record gradients w.r.t. module outputs.
        allow_multiple: allow another recorder on the same model.

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
        include: Selector = None,
        exclude: Selector = None,
        activations: bool = True,
        activation_grads: bool = True,
        allow_multiple: bool = False,
    ) -> None:
        if not callable(every) and (isinstance(every, bool) or int(every) < 1):
            raise ValueError(f"every must be an integer >= 1 or a callable, got {every!r}")
        self.every = every
        self.include = include
        self.exclude = exclude
        self.activations = activations
        self.activation_grads = activation_grads
        self.allow_multiple = allow_multiple
        self.nonfinite: list[NonfiniteEvent] = []
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._handles: list[RemovableHandle] = []
        self._params: list[tuple[str, nn.Parameter]] = []
        self._rows: list[pd.DataFrame] = []
        self._step = 0
        self._recording = False
        self._reset_buffers()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self.model is not None

    @property
    def step_index(self) -> int:
        """The index of the step now being run (0 before the first update)."""
        return self._step

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Recorder:
        """Registers the hooks; every registration is kept as a removable handle."""
        if self.attached:
            raise RecorderError("this recorder is already attached; detach() it first")
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        if not self.allow_multiple and _has_recorder(model):
            raise RecorderError(
                "another gradscope Recorder is attached to this model; detach it first, "
                "or pass allow_multiple=True"
            )
        self._params = [
            (name, p)
            for name, p in model.named_parameters()
            if p.requires_grad and self._selected(name.rpartition(".")[0], model)
        ]
        if optimizer is not None and not self._params:
            raise RecorderError(
                "the model has no trainable parameters, so there is nothing for the optimizer "
                "to update; watch it without an optimizer to record activations only"
            )
        self.model, self.optimizer = model, optimizer
        for fqn, module in model.named_modules():
            if next(module.children(), None) is not None or not self._selected(fqn, model):
                continue
            hook = functools.partial(
                self._on_forward, fqn or type(module).__name__, stats.activation_bounds(module)
            )
            self._handles.append(module.register_forward_hook(_RecorderHook(self, hook)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self._recording = self._should_record(self._step)
        return self

    def detach(self) -> None:
        """Removes every hook and buffer; the recorded rows stay. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset_buffers()
        self.model, self.optimizer = None, None
        self._params = []
        self._recording = False

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _selected(self, fqn: str, model: nn.Module) -> bool:
        module = model.get_submodule(fqn) if fqn else model
        if self.include is not None and not _matches(self.include, fqn, module):
            return False
        return not _matches(self.exclude, fqn, module)

    def _should_record(self, step: int) -> bool:
        if callable(self.every):
            return bool(self.every(step))
        return step % int(self.every) == 0

    def _reset_buffers(self) -> None:
        self._act_calls: list[tuple[str, int, bool, torch.Tensor]] = []
        self._grad_calls: list[tuple[str, torch.Tensor]] = []
        self._scalars: list[tuple[str, torch.Tensor | float]] = []
        self._param_pending: dict[str, Any] | None = None

    # -- hooks -----------------------------------------------------------------------------

    def _on_forward(
        self, fqn: str, bounds: tuple[float, float] | None, module: nn.Module, args: Any, out: Any
    ) -> None:
        if not self._recording or not torch.is_grad_enabled():
            return
        for label, tensor in _tensor_outputs(out, fqn):
            if self.activations:
                moments = stats.activation_moments(tensor, bounds)
                self._act_calls.append((label, tensor.numel(), bounds is not None, moments))
            if self.activation_grads and tensor.requires_grad:
                tensor.register_hook(functools.partial(self._on_output_grad, label))

    def _on_output_grad(self, label: str, grad: torch.Tensor) -> None:
        if self._recording:
            self._grad_calls.append((label, stats.grad_moments(grad)))

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._recording:
            self._read_params(snapshot=True)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._close_step()

    def step(self) -> None:
        """Closes a step in loops without an optimizer: reads parameter gradients now."""
        if not self.attached:
            raise RecorderError("step() on a detached recorder; attach() it first")
        if self.optimizer is not None:
            raise RecorderError("an optimizer is attached: its step() closes each step")
        if self._recording:
            self._read_params(snapshot=False)
        self._close_step()

    def log_scalar(self, stat: str, value: torch.Tensor | float) -> None:
        """Logs a scalar (the loss, a pre-clip norm) for the current step, if it is recorded."""
        if self._recording:
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            self._scalars.append((stat, value))

    # -- step bookkeeping ------------------------------------------------------------------

    def _read_params(self, snapshot: bool) -> None:
        with_grad = [(n, p) for n, p in self._params if p.grad is not None]
        if not with_grad:
            return
        params = [p.detach() for _, p in with_grad]
        grads = [p.grad.detach() for _, p in with_grad if p.grad is not None]
        with torch.no_grad():
            self._param_pending = {
                "names": [n for n, _ in with_grad],
                "grads": grads,
                "grad_norm": stats.foreach_norms(grads),
                "grad_max": stats.foreach_max_abs(grads),
                "param_norm": stats.foreach_norms(params),
                "params": params,
                # an exact copy: the applied update is measured as after - before
                "before": torch._foreach_mul(params, 1.0) if snapshot and params else None,
            }

    def _close_step(self) -> None:
        step = self._step
        if self._recording:
            self._collect(step)
        self._reset_buffers()
        self._step += 1
        self._recording = self._should_record(self._step)

    def _collect(self, step: int) -> None:
        """Moves one step's statistics to the host in one transfer and appends its rows."""
        rows: list[tuple[str, str, str, float]] = []
        device_parts: list[torch.Tensor] = []
        if self._act_calls:
            device_parts.append(torch.stack([m for *_, m in self._act_calls]).flatten())
        if self._grad_calls:
            device_parts.append(torch.stack([m for _, m in self._grad_calls]).flatten())
        pending = self._param_pending
        if pending is not None:
            device_parts += [pending["grad_norm"], pending["grad_max"], pending["param_norm"]]
            if pending["before"] is not None:
                with torch.no_grad():
                    updates = torch._foreach_sub(pending["params"], pending["before"])
                device_parts.append(stats.foreach_norms(list(updates)))
        scalars = [v for _, v in self._scalars]
        if scalars:
            device_parts.append(
                torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()) for v in scalars])
            )
        if not device_parts:
            return
        flat = torch.cat([p.to("cpu", torch.float64) for p in device_parts]).numpy()
        offset = 0

        def take(n: int) -> np.ndarray:
            nonlocal offset
            out = flat[offset : offset + n]
            offset += n
            return out

        forward_origin = backward_origin = None
        if self._act_calls:
            k = len(stats.ACT_FIELDS)
            moments = take(k * len(self._act_calls)).reshape(-1, k)
            grouped: dict[str, list[int]] = {}
            for i, (label, *_rest) in enumerate(self._act_calls):
                grouped.setdefault(label, []).append(i)
                if forward_origin is None and moments[i, 5] > 0:
                    forward_origin = label
            for label, idx in grouped.items():
                count = sum(self._act_calls[i][1] for i in idx)
                bounded = self._act_calls[idx[0]][2]
                merged = stats.merge_activation_moments(moments[idx])
                for stat, value in stats.activation_stats(merged, count, bounded).items():
                    rows.append((label, "activation", stat, value))
        if self._grad_calls:
            k = len(stats.GRAD_FIELDS)
            moments = take(k * len(self._grad_calls)).reshape(-1, k)
            grouped = {}
            for i, (label, _) in enumerate(self._grad_calls):
                grouped.setdefault(label, []).append(i)
                if backward_origin is None and moments[i, 3] > 0:
                    backward_origin = label
            for label, idx in grouped.items():
                for stat, value in stats.grad_stats(moments[idx].sum(axis=0)).items():
                    rows.append((label, "activation_grad", stat, value))
        if pending is not None:
            n = len(pending["names"])
            grad_norm, grad_max, param_norm = take(n), take(n), take(n)
            update_norm = take(n) if pending["before"] is not None else None
            for i, name in enumerate(pending["names"]):
                nonfinite = 0.0
                if not math.isfinite(grad_norm[i]):
                    nonfinite = float(stats.count_nonfinite(pending["grads"][i]))
                rows += [
                    (name, "param_grad", "norm", grad_norm[i]),
                    (name, "param_grad", "max_abs", grad_max[i]),
                    (name, "param_grad", "nonfinite", nonfinite),
                    (name, "param", "norm", param_norm[i]),
                    (name, "param", "ndim", float(pending["params"][i].dim())),
                ]
                if update_norm is not None:
                    ratio = update_norm[i] / param_norm[i] if param_norm[i] > 0 else math.nan
                    rows += [
                        (name, "update", "norm", update_norm[i]),
                        (name, "update", "ratio", ratio),
                    ]
            rows.append(("*", "param_grad", "norm", math.sqrt(float(np.square(grad_norm).sum()))))
        if scalars:
            values = take(len(scalars))
            rows += [("*", "scalar", name, values[i]) for i, (name, _) in enumerate(self._scalars)]
        if forward_origin is not None:
            rows.append((forward_origin, "nonfinite_origin", "forward", 1.0))
        if backward_origin is not None:
            rows.append((backward_origin, "nonfinite_origin", "backward", 1.0))
        for phase, origin in (("forward", forward_origin), ("backward", backward_origin)):
            if origin is not None:
                self.nonfinite.append(NonfiniteEvent(step, phase, origin))
        block = pd.DataFrame(rows, columns=COLUMNS[1:])
        block.insert(0, "step", step)
        self._rows.append(block)

    # -- results ---------------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        """All recorded steps as one long-form frame: step, layer, kind, stat, value."""
        if not self._rows:
            return pd.DataFrame(
                {
                    "step": pd.Series(dtype="int64"),
                    **{c: pd.Series(dtype="object") for c in COLUMNS[1:4]},
                    "value": pd.Series(dtype="float64"),
                }
            )
        frame = pd.concat(self._rows, ignore_index=True)
        frame["value"] = frame["value"].astype("float64")
        frame["step"] = frame["step"].astype("int64")
        return frame

    def diagnose(self) -> list[Any]:
        """Verdicts over everything recorded so far (see gradscope.diagnose)."""
        from gradscope.diagnose import diagnose

        return diagnose(self.to_frame())


class _RecorderHook:
    """A forward hook that knows its recorder, so a second recorder can be detected."""

    __slots__ = ("recorder", "fn")

    def __init__(self, recorder: Recorder, fn: Callable[..., None]) -> None:
        self.recorder = recorder
        self.fn = fn

    def __call__(self, module: nn.Module, args: Any, out: Any) -> None:
        self.fn(module, args, out)


def _has_recorder(model: nn.Module) -> bool:
    return any(
        isinstance(hook, _RecorderHook) and hook.recorder.attached
        for module in model.modules()
        for hook in module._forward_hooks.values()
    )


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
