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
- ``block_index`` (under both ``activation`` and ``activation_grad``, blocks only): the
  block's position in the residual stream, 0 nearest the input (``frame.stream_layers``).

Which modules' outputs are recorded: by default every leaf module and every block, a block
being a composite module that is an element of an ``nn.ModuleList`` or ``nn.Sequential``
(``blocks.7``, ``transformer.h.3``, ``layers.2``; see ``block_fqns``): their outputs are the
residual stream. ``include=`` (globs or a predicate) selects any modules instead, leaf or
composite; ``exclude=`` removes modules. Parameters are recorded once each, under their own
fqn: those of every selected module and of the modules inside a selected composite one.
- ``nonfinite_origin``: on a step with a non-finite value, ``stat="forward"`` names the first
  module in forward order whose output became non-finite, ``stat="backward"`` the first in
  backward order whose gradient did (value 1).
- ``scalar`` (layer ``"*"``): values logged with ``Recorder.log_scalar`` (loss, pre-clip norm).

Norms are exact: they equal ``torch.linalg.vector_norm(t.double())`` to 1e-6 relative, down
to float32 subnormals. How: CPU float32/float64 tensors go through one-pass C kernels
(``gradscope.native``, compiled on first use) that accumulate in float64 and count non-finite
values as they go; other tensors (GPU, bfloat16, or where no C compiler is found) through
torch ops, as float32 cascade sums of squares redone in float64 where a square may have
underflowed or overflowed; for those, module outputs and output gradients are held until the
recorded step closes so that they can be recounted. ``min`` and ``max`` ignore NaN (counted
in ``nonfinite``). Statistics of all calls of a module within one step (shared weights,
micro-batches) are merged from additive moments. Forward passes under ``torch.no_grad()``
(evaluation) are skipped. Device statistics move to the host once per recorded step. From
its first recorded step until detach the recorder keeps a copy of the recorded parameters
(to measure the update) and work buffers (about the parameters' size again, plus the largest
module output). Steps that are not recorded run no forward hook at all.

Rows are held in memory compactly: a step's values (8 bytes a row) and the index of its
layout (the layer, kind and stat of each row, shared by all steps with the same layout);
nothing else grows with the number of steps. For long runs pass ``spill_to=DIR``: whenever
``spill_rows`` rows are held they are written to ``DIR/part-NNNNNN.parquet`` (each part
complete on disk as soon as it is written), and ``to_frame()`` reads the parts back.

Under DDP and FSDP2 the statistics are merged over ranks (see ``Recorder(sync=...)``);
compiled models get parameter statistics only.
"""

from __future__ import annotations

import fnmatch
import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradscope import distributed, native, stats
from gradscope.files import atomic_write

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


@dataclass(frozen=True)
class NonfiniteEvent:
    """Where a non-finite value first appeared in a step."""

    step: int
    phase: str  # "forward" (module output) or "backward" (gradient w.r.t. the output)
    layer: str


class _GradCall(NamedTuple):
    """One output gradient seen in backward."""

    label: str
    samples: int
    # torch-op path: per-sample sums of squares on the device, and the gradient itself, held
    # for an exact recount (None where the C kernels took the call: their rows are exact)
    sample_sumsq: torch.Tensor | None
    grad: torch.Tensor | None
    # index into the step's GradScaler scales: the scale of the forward this backward
    # belongs to (-1: no scaler, or no forward seen; the scale at the step's end is used)
    scale: int


class RecorderError(RuntimeError):
    """Misuse of a Recorder: a second recorder on a model, a missing optimizer, ..."""


def _matches(selector: Selector, fqn: str, module: nn.Module) -> bool:
    if selector is None:
        return False
    if callable(selector):
        return bool(selector(fqn, module))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    return any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


def block_fqns(model: nn.Module) -> list[str]:
    """The blocks of a network, in module order: each composite module that is an element of
    an nn.ModuleList or nn.Sequential (``blocks.7``, ``transformer.h.3``, ``layers.2``).

    Their outputs are the residual stream between blocks. Containers without a forward of
    their own (ModuleList, ModuleDict) are not blocks themselves.
    """
    found = []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.ModuleList | nn.Sequential):
            for name, child in module.named_children():
                composite = next(child.children(), None) is not None
                if composite and not isinstance(child, nn.ModuleList | nn.ModuleDict):
                    found.append(f"{fqn}.{name}" if fqn else name)
    return found


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
        include: module fqn globs or a predicate `(fqn, module) -> bool` selecting any module,
            leaf or composite; default every leaf and every block (see the module docstring).
        exclude: the same, removing modules (and their parameters) from the selection.
        activations: record forward statistics of module outputs (default: yes, except on
            compiled models, whose modules run inside the compiled graph).
        activation_grads: record gradients w.r.t. module outputs (same default).
        allow_multiple: allow another recorder on the same model.
        sync: merge statistics over ranks (default: yes for DDP and FSDP2 models in an
            initialized process group). Rank 0 keeps the rows; other ranks keep none.
        grad_scaler: the torch.amp.GradScaler of the loop, if any: output gradients are then
            divided by its scale (parameter gradients need nothing: the scaler unscales them
            before the optimizer steps). A step the scaler skips (inf/NaN found) runs no
            optimizer hook; its statistics merge into the next recorded step.
        spill_to: a directory for long runs: rows go to Parquet parts there instead of
            accumulating in memory (it must not hold another recording's parts).
        spill_rows: how many rows are held in memory before they are written out.

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
        activations: bool | None = None,
        activation_grads: bool | None = None,
        allow_multiple: bool = False,
        sync: bool | None = None,
        grad_scaler: Any = None,
        spill_to: str | os.PathLike[str] | None = None,
        spill_rows: int = 200_000,
    ) -> None:
        if not callable(every) and (isinstance(every, bool) or int(every) < 1):
            raise ValueError(f"every must be an integer >= 1 or a callable, got {every!r}")
        if spill_rows < 1:
            raise ValueError(f"spill_rows must be >= 1, got {spill_rows}")
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
        self._forward_handles: list[RemovableHandle] = []
        self._modules: list[tuple[str, nn.Module]] = []
        # (module, hook) for each selected module: registered on recorded steps only
        self._forward_hooks: list[tuple[nn.Module, Callable[..., None]]] = []
        # each watched block's position in the stream (see block_fqns), by fqn
        self._block_index: dict[str, float] = {}
        # per kind: the label list last seen, and its block labels and indices
        self._block_rows: dict[str, tuple[list[str], list[str], np.ndarray]] = {}
        self._params: list[tuple[str, nn.Parameter]] = []
        self._param_names: list[str] = []
        self._param_ndims = np.zeros(0)
        # parameter statistics (with their buffers), from the first recorded read
        self._flat: stats.FlatStats | native.ParamStats | None = None
        # exact statistics from the C kernels, written straight into host rows
        self._native_acts = _HostRows(len(native.MOMENT_FIELDS))
        self._native_grads = _HostRows(len(native.GRAD_FIELDS))
        self._scratch = stats.Scratch()
        self._act_labels, self._grad_labels = _LabelIndex(), _LabelIndex()
        self._rows: list[tuple[int, int, np.ndarray]] = []  # step, layout index, values
        self._layouts: list[_Layout] = []
        self._rows_held = 0
        self.spill_to = Path(spill_to) if spill_to is not None else None
        self.spill_rows = spill_rows
        self._parts: list[Path] = []
        self.sync = sync
        self.grad_scaler = grad_scaler
        self._sync = False
        # a parameter (or its gradient) as this rank holds it: the local shard of an FSDP2
        # DTensor, else the tensor itself (decided at attach, so plain models pay nothing)
        self._as_local: Callable[[torch.Tensor], torch.Tensor] = _same
        self._record_acts = self._record_grads = False
        self._step = 0
        self._recording = False
        self._reset_buffers()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self.model is not None

    @property
    def recording(self) -> bool:
        """Whether the step now being run is recorded."""
        return self._recording

    def record_now(self) -> None:
        """Records the current step even where `every` skips it.

        Hooks are armed from now on: statistics of a forward pass already run in this step
        are not recovered, so call this before the forward (the training loop reruns the
        forward of a step whose loss came out non-finite).
        """
        if not self.attached:
            raise RecorderError("record_now() on a detached recorder; attach() it first")
        self._reset_buffers()
        self._set_recording(True)

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
        if self.spill_to is not None and not self._parts:
            self._check_spill_dir(self.spill_to)
        outer = model
        model, kind = distributed.unwrap(model)
        compiled = kind == "compiled" or distributed.has_compiled_parts(model)
        if compiled and (self.activations or self.activation_grads):
            raise RecorderError(
                "activation statistics need eager modules, and this model is compiled: pass "
                "activations=False, activation_grads=False (parameter statistics stay exact, "
                "read at optimizer time), or record activations on an uncompiled copy"
            )
        self._record_acts = not compiled if self.activations is None else self.activations
        self._record_grads = (
            not compiled if self.activation_grads is None else self.activation_grads
        )
        self._params = [
            (name, p)
            for name, p in model.named_parameters()
            if p.requires_grad and self._param_selected(name.rpartition(".")[0], model)
        ]
        self._param_names = [name for name, _ in self._params]
        self._param_ndims = np.array([float(p.dim()) for _, p in self._params])
        sharded = any(distributed.is_sharded(p) for _, p in self._params)
        dtensors = any(distributed.local(p) is not p for _, p in self._params)
        self._as_local = distributed.local if dtensors else _same
        self._sync = (
            self.sync
            if self.sync is not None
            else distributed.world_size() > 1 and (kind == "ddp" or sharded)
        )
        if optimizer is not None and not self._params:
            raise RecorderError(
                "the model has no trainable parameters, so there is nothing for the optimizer "
                "to update; watch it without an optimizer to record activations only"
            )
        self.model, self.optimizer = outer, optimizer
        blocks = set(block_fqns(model))
        self._modules = [
            (fqn or type(module).__name__, module)
            for fqn, module in (model.named_modules() if not compiled else ())
            if self._watched(fqn, module, blocks)
        ]
        watched = {label for label, _ in self._modules}
        self._block_index = {
            fqn: float(i) for i, fqn in enumerate(b for b in block_fqns(model) if b in watched)
        }
        self._forward_hooks = [
            (module, functools.partial(self._on_forward, label, _band(module)))
            for label, module in self._modules
        ]
        # a do-nothing pre-hook on the root marks the model as watched while no forward hooks
        # are armed (they are removed on steps that are not recorded, which then cost nothing)
        root_hook = self._on_root_forward if self._scaler_enabled() else _no_op
        self._handles.append(outer.register_forward_pre_hook(_RecorderHook(self, root_hook)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self._set_recording(self._should_record(self._step))
        return self

    def _set_recording(self, on: bool) -> None:
        """Arms the forward hooks for a recorded step and removes them after it."""
        self._recording = on
        if on and not self._forward_handles and (self._record_acts or self._record_grads):
            for module, hook in self._forward_hooks:
                self._forward_handles.append(module.register_forward_hook(hook))
        elif not on:
            for handle in self._forward_handles:
                handle.remove()
            self._forward_handles.clear()

    def detach(self) -> None:
        """Removes every hook and buffer; the recorded rows stay. Safe to call twice."""
        self._set_recording(False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset_buffers()
        if self._rows_held:
            self._spill()
        self.model, self.optimizer = None, None
        self._params = []
        self._modules = []
        self._forward_hooks = []
        self._flat = None
        self._scratch.clear()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _watched(self, fqn: str, module: nn.Module, blocks: set[str]) -> bool:
        """Whether a module's outputs are recorded: by default each leaf and each block (see
        block_fqns); with `include`, the modules it matches, leaf or composite."""
        if self.include is None:
            chosen = next(module.children(), None) is None or fqn in blocks
        else:
            chosen = _matches(self.include, fqn, module)
        return chosen and not _matches(self.exclude, fqn, module)

    def _param_selected(self, owner: str, model: nn.Module) -> bool:
        """Whether the parameters of module `owner` are recorded: those of every module the
        selection covers (a selected composite module covers its submodules' parameters),
        unless `exclude` matches their own module."""
        module = model.get_submodule(owner) if owner else model
        if _matches(self.exclude, owner, module):
            return False
        if self.include is None:
            return True
        parts = owner.split(".") if owner else []
        prefixes = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]  # owner ... root
        return any(_matches(self.include, p, model.get_submodule(p)) for p in prefixes)

    def _should_record(self, step: int) -> bool:
        if callable(self.every):
            return bool(self.every(step))
        return step % int(self.every) == 0

    def _reset_buffers(self) -> None:
        # per call: label, numel, moments on the device, and the output itself, held until the
        # step closes so that non-finite or underflowed results can be recounted exactly
        # (the output is None where the C kernels took it: their statistics are exact)
        self._act_calls: list[tuple[str, int, torch.Tensor | None]] = []
        self._act_moments: list[torch.Tensor] = []  # ACT_FIELDS of the torch-op calls
        self._native_acts.reset()
        self._native_grads.reset()
        self._saturated: list[tuple[int, torch.Tensor]] = []  # (call index, count)
        self._grad_calls: list[_GradCall] = []
        # the GradScaler's scale at each recorded forward, as device tensors (no host sync):
        # a step the scaler skips merges into the next, and each backward's gradients must be
        # divided by the scale it was made with, not by the next step's
        self._scales: list[torch.Tensor] = []
        self._scalars: list[tuple[str, torch.Tensor | float]] = []
        self._param_pending: dict[str, Any] | None = None

    # -- hooks -----------------------------------------------------------------------------

    def _scaler_enabled(self) -> bool:
        return self.grad_scaler is not None and bool(self.grad_scaler.is_enabled())

    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        if self._recording and self._record_grads and torch.is_grad_enabled():
            scaler = self.grad_scaler
            scale = scaler._get_scale_async()  # None until the scaler's first scale()
            if scale is None:
                self._scales.append(torch.tensor([float(scaler.get_scale())]))
            else:
                self._scales.append(scale.detach().reshape(1).clone())

    def _on_forward(
        self, fqn: str, band: tuple[float, float] | None, module: nn.Module, args: Any, out: Any
    ) -> None:
        if not self._recording or not torch.is_grad_enabled():
            return
        if isinstance(out, torch.Tensor):  # the common case, without the generator
            if out.is_floating_point():
                self._observe(fqn, band, out)
            return
        for label, tensor in _tensor_outputs(out, fqn):
            self._observe(label, band, tensor)

    def _observe(self, label: str, band: tuple[float, float] | None, tensor: torch.Tensor) -> None:
        """Statistics of one output tensor, and a hook for its gradient."""
        if self._record_acts:
            numel = tensor.numel()
            if numel and native.takes(tensor):
                if band is not None:
                    count = native.saturated(tensor, band)
                    self._saturated.append(
                        (len(self._act_calls), torch.tensor(count, dtype=torch.float64))
                    )
                native.moments(tensor, self._native_acts.take(1))
                self._act_calls.append((label, numel, None))
            else:
                if band is not None:
                    count_t = stats.saturated_count(tensor, band)
                    self._saturated.append((len(self._act_calls), count_t))
                self._act_moments.extend(stats.activation_moments(tensor, self._scratch))
                self._act_calls.append((label, numel, tensor))
        if self._record_grads and tensor.requires_grad:
            node = tensor.grad_fn
            if node is None:  # a leaf: a tensor hook
                tensor.register_hook(functools.partial(self._on_output_grad, label))
            else:  # cheaper, and the same gradient: a pre-hook on the node that made it
                node.register_prehook(
                    functools.partial(self._on_node_grads, label, tensor.output_nr)
                )

    def _on_node_grads(self, label: str, output_nr: int, grads: tuple[Any, ...]) -> None:
        grad = grads[output_nr]
        if grad is not None:
            self._on_output_grad(label, grad)

    def _on_output_grad(self, label: str, grad: torch.Tensor) -> None:
        if not self._recording:
            return
        samples = 1 if grad.dim() == 0 else grad.shape[0]
        scale = len(self._scales) - 1
        if native.takes(grad):
            native.grad_rows(grad, samples, self._native_grads.take(1))
            self._grad_calls.append(_GradCall(label, samples, None, None, scale))
        else:
            sumsq = stats.sample_sumsq(grad, self._scratch)
            self._grad_calls.append(_GradCall(label, samples, sumsq, grad, scale))

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
        """Gradient and parameter sums of squares (and a pre-update copy), on the device."""
        # FSDP2 shards are DTensors: statistics of the local shards, merged over ranks later
        local = self._as_local
        present, grads, params = [], [], []
        for i, (_, p) in enumerate(self._params):
            if p.grad is not None:
                present.append(i)
                grads.append(_strided(local(p.grad)))
                params.append(local(p))
        if not present:
            return
        if self._flat is not None and not self._flat.fits(present, params):
            self._flat = None  # parameters resized, retyped or moved since: new buffers
        if self._flat is None:
            all_params = [local(p) for _, p in self._params]
            usable = native.ParamStats.usable(all_params)
            self._flat = native.ParamStats(all_params) if usable else stats.FlatStats(all_params)
        with torch.no_grad():
            values = self._flat.read(present, grads, params, snapshot)
        self._param_pending = {"present": present, "snapshot": snapshot, "device": values}

    def _local(self, i: int) -> torch.Tensor:
        return self._as_local(self._params[i][1].detach())

    def _close_step(self) -> None:
        step = self._step
        if self._recording:
            self._collect(step)
        self._reset_buffers()
        self._step += 1
        self._set_recording(self._should_record(self._step))

    def _collect(self, step: int) -> None:
        """Moves one step's statistics to the host in one transfer and appends its rows."""
        acts, grads, pending = self._act_calls, self._grad_calls, self._param_pending
        parts: list[torch.Tensor] = []
        if self._act_moments:
            parts.append(_stack_float64(self._act_moments))
        if self._saturated:
            parts.append(_stack_float64([c for _, c in self._saturated]))
        scales = self._scales if grads else []
        if scales:
            parts.append(_cat_float64(scales))
        eager_grads = [g.sample_sumsq for g in grads if g.sample_sumsq is not None]
        if eager_grads:
            parts.append(_cat_float64(eager_grads))
        if pending is not None:
            parts += pending["device"]
            if pending["snapshot"] and self._flat is not None:
                present = pending["present"]
                # read again after the step: a DTensor's local shard may be a new tensor
                params = [self._as_local(self._params[i][1]) for i in present]
                with torch.no_grad():
                    parts.append(self._flat.updates(present, params))
        if self._scalars:
            parts.append(
                torch.stack(
                    [torch.as_tensor(v, dtype=torch.float64).reshape(()) for _, v in self._scalars]
                )
            )
        if not (parts or acts or grads):
            return
        # the one host transfer of the step (none where the C kernels wrote every row)
        flat = (
            torch.cat([p.to("cpu", torch.float64).flatten() for p in parts]).numpy().copy()
            if parts
            else np.zeros(0)
        )
        reader = _Reader(flat)
        rows = _Rows()
        origins = {}
        if acts:
            origins["forward"] = self._activation_rows(rows, reader)
        if grads:
            origins["backward"] = self._grad_rows(rows, reader, reader.take(len(scales)))
        if pending is not None:
            self._param_rows(rows, pending, reader)
        if self._scalars:
            scalar_values = reader.take(len(self._scalars))
            if self._sync:
                scalar_values = (
                    distributed.all_reduce_array(scalar_values, "sum") / distributed.world_size()
                )
            rows.add(
                ["*"] * len(self._scalars),
                "scalar",
                [n for n, _ in self._scalars],
                scalar_values,
            )
        for phase, origin in origins.items():
            if origin is not None:
                rows.add([origin], "nonfinite_origin", phase, np.ones(1))
                self.nonfinite.append(NonfiniteEvent(step, phase, origin))
        if not self._sync or distributed.rank() == 0:
            layout, values = rows.finish(self._layouts[-1] if self._layouts else None)
            if not self._layouts or layout is not self._layouts[-1]:
                self._layouts.append(layout)
            self._rows.append((step, len(self._layouts) - 1, values))
            self._rows_held += len(values)
            if self._rows_held >= self.spill_rows:
                self._spill()

    def _activation_rows(self, rows: _Rows, reader: _Reader) -> str | None:
        acts = self._act_calls
        n_calls = len(acts)
        eager = np.array([c[2] is not None for c in acts], dtype=bool)
        moments = np.empty((n_calls, len(stats.ACT_FIELDS)))
        nonfinite = np.zeros(n_calls)
        fields = len(stats.ACT_FIELDS)
        moments[eager] = reader.take(fields * int(eager.sum())).reshape(-1, fields)
        if not eager.all():  # the kernels' exact rows: sum, sumsq, min, max, nonzero, nonfinite
            exact = self._native_acts.rows()
            moments[~eager] = exact[:, [0, 2, 3, 4, 1]]
            nonfinite[~eager] = exact[:, 5]
        saturated = reader.take(len(self._saturated))
        numel = np.array([c[1] for c in acts], dtype=np.float64)
        suspect = ~np.isfinite(moments).all(axis=1) | stats.needs_exact(moments[:, 4], numel)
        for i in np.flatnonzero(suspect & eager):  # recount from the held output
            tensor = acts[i][2]
            assert tensor is not None
            moments[i, 4] = float(stats.exact_norm(tensor)) ** 2
            if not np.isfinite(moments[i]).all():
                nonfinite[i] = stats.count_nonfinite(tensor)
                moments[i, 3] = float(torch.count_nonzero(tensor))
                finite = tensor[~torch.isnan(tensor)]  # extremes ignore NaN, as the kernels do
                moments[i, 1:3] = (
                    [float(finite.min()), float(finite.max())] if finite.numel() else np.nan
                )
        origin = acts[int(np.flatnonzero(nonfinite > 0)[0])][0] if (nonfinite > 0).any() else None
        names, label_id = self._act_labels([c[0] for c in acts])
        n = len(names)
        lo = np.full(n, np.inf)
        hi = np.full(n, -np.inf)
        # extremes over calls ignore NaN, as within a call (a kernel's call with no value but
        # NaN gives inf, -inf; a torch-op call NaN)
        np.fmin.at(lo, label_id, moments[:, 1])
        np.fmax.at(hi, label_id, moments[:, 2])
        sat_calls = [i for i, _ in self._saturated]
        sums = np.stack(
            [
                np.bincount(label_id, moments[:, 0], n),
                np.bincount(label_id, moments[:, 4], n),
                np.bincount(label_id, moments[:, 3], n),
                np.bincount(label_id, numel, n),
                np.bincount(label_id, nonfinite, n),
                np.bincount(label_id[sat_calls], saturated, n),
                np.bincount(label_id[sat_calls], minlength=n).astype(np.float64),
            ]
        )
        if self._sync:  # additive moments add over ranks; extremes take min/max
            self._check_same_layers(names)
            sums = distributed.all_reduce_array(sums, "sum")
            lo = distributed.all_reduce_array(lo, "min")
            hi = distributed.all_reduce_array(hi, "max")
        no_value = lo > hi  # a layer with no value but NaN (counted in nonfinite)
        lo[no_value] = hi[no_value] = np.nan
        total, sumsq, nonzero, count, nonfinite_sum, sat, bounded_calls = sums
        values = stats.activation_stats(total, sumsq, lo, hi, nonzero, count, nonfinite_sum)
        for stat, column in values.items():
            rows.add(names, "activation", stat, column)
        self._add_block_rows(rows, "activation", names)
        bounded = bounded_calls > 0
        if bounded.any():
            rows.add(
                [names[i] for i in np.flatnonzero(bounded)],
                "activation",
                "saturated_frac",
                (sat / np.maximum(count, 1.0))[bounded],
            )
        return origin

    def _grad_rows(self, rows: _Rows, reader: _Reader, scales: np.ndarray) -> str | None:
        grads = self._grad_calls
        # per call: sum of squares, sum of the samples' norms, samples with non-finite values
        per_call = np.empty((len(grads), len(native.GRAD_FIELDS)))
        eager = np.array([g.grad is not None for g in grads], dtype=bool)
        per_call[~eager] = self._native_grads.rows()  # exact already
        eager_calls = np.flatnonzero(eager)
        sample_sumsq = reader.take(sum(grads[c].samples for c in eager_calls))
        start = 0
        for c in eager_calls:
            samples, grad = grads[c].samples, grads[c].grad
            assert grad is not None
            sumsq = sample_sumsq[start : start + samples]
            start += samples
            if stats.needs_exact(sumsq, grad.numel() // max(samples, 1)).any():
                matrix = grad.reshape(1, -1) if grad.dim() == 0 else grad.reshape(samples, -1)
                sumsq = np.square(stats.exact_norm(matrix, dim=1).cpu().numpy())
            norms = np.sqrt(sumsq)
            per_call[c] = sumsq.sum(), norms.sum(), np.count_nonzero(~np.isfinite(norms))
        if self._scaler_enabled():
            # each backward's own scale; the scale now where no forward was seen
            now = float(self.grad_scaler.get_scale())
            scale = np.array([scales[g.scale] if g.scale >= 0 else now for g in grads])
            per_call[:, 0] /= scale**2
            per_call[:, 1] /= scale
        bad = np.flatnonzero(per_call[:, 2] > 0)
        origin = grads[int(bad[0])].label if len(bad) else None
        names, label_id = self._grad_labels([g.label for g in grads])
        n = len(names)
        sample_counts = np.array([g.samples for g in grads], dtype=np.float64)
        sums = np.stack(
            [
                np.bincount(label_id, sample_counts, n),
                np.bincount(label_id, per_call[:, 0], n),
                np.bincount(label_id, per_call[:, 1], n),
                np.bincount(label_id, per_call[:, 2], n),
            ]
        )
        if self._sync:
            self._check_same_layers(names)
            sums = distributed.all_reduce_array(sums, "sum")
            # each rank's loss averages its own batch; DDP and FSDP average the gradients over
            # ranks, so the global batch's output gradients are 1/world of the local ones
            world = distributed.world_size()
            sums[1] /= world**2
            sums[2] /= world
        values = stats.grad_stats(*sums)
        for stat, column in values.items():
            rows.add(names, "activation_grad", stat, column)
        self._add_block_rows(rows, "activation_grad", names)
        return origin

    def _add_block_rows(self, rows: _Rows, kind: str, names: list[str]) -> None:
        """`block_index` rows: each block output's position in the stream."""
        if not self._block_index:
            return
        cached = self._block_rows.get(kind)
        if cached is None or cached[0] is not names:  # label lists are kept while calls repeat
            labels = [n for n in names if n.partition("[")[0] in self._block_index]
            index = np.array([self._block_index[n.partition("[")[0]] for n in labels])
            cached = self._block_rows[kind] = (names, labels, index)
        _, labels, index = cached
        if labels:
            rows.add(labels, kind, "block_index", index)

    def _check_same_layers(self, names: list[str]) -> None:
        counts = np.array([len(names)], dtype=np.float64)
        if (
            distributed.all_reduce_array(counts, "min")[0]
            != distributed.all_reduce_array(counts, "max")[0]
        ):
            raise RecorderError("ranks recorded different modules in one step; cannot merge")

    def _param_rows(self, rows: _Rows, pending: dict[str, Any], reader: _Reader) -> None:
        present = pending["present"]
        if len(present) == len(self._params):  # the usual case: every parameter has a gradient
            names, ndims = self._param_names, self._param_ndims
        else:
            names, ndims = [self._param_names[i] for i in present], self._param_ndims[present]
        n = len(names)
        grad_sumsq, grad_max, nonfinite = reader.take(n), reader.take(n), reader.take(n)
        param_sumsq = reader.take(n)
        update_sumsq = reader.take(n) if pending["snapshot"] else None
        assert self._flat is not None
        if not self._flat.exact:
            self._recount_params(pending, grad_sumsq, param_sumsq, update_sumsq, nonfinite)
        sharded = (
            [k for k, i in enumerate(present) if distributed.is_sharded(self._params[i][1])]
            if self._sync
            else []
        )
        if sharded:  # a shard's squares and counts are part of the whole tensor's
            for values, op in ((grad_sumsq, "sum"), (param_sumsq, "sum"), (nonfinite, "sum")):
                values[sharded] = distributed.all_reduce_array(values[sharded], op)
            grad_max[sharded] = distributed.all_reduce_array(grad_max[sharded], "max")
            if update_sumsq is not None:
                update_sumsq[sharded] = distributed.all_reduce_array(update_sumsq[sharded], "sum")
        grad_norm, param_norm = np.sqrt(grad_sumsq), np.sqrt(param_sumsq)
        rows.add(names, "param_grad", "norm", grad_norm)
        rows.add(names, "param_grad", "max_abs", grad_max)
        rows.add(names, "param_grad", "nonfinite", nonfinite)
        rows.add(names, "param", "norm", param_norm)
        rows.add(names, "param", "ndim", ndims)
        if update_sumsq is not None:
            update_norm = np.sqrt(update_sumsq)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(param_norm > 0, update_norm / param_norm, np.nan)
            rows.add(names, "update", "norm", update_norm)
            rows.add(names, "update", "ratio", ratio)
        rows.add(["*"], "param_grad", "norm", np.sqrt(np.square(grad_norm).sum(keepdims=True)))

    def _recount_params(
        self,
        pending: dict[str, Any],
        grad_sumsq: np.ndarray,
        param_sumsq: np.ndarray,
        update_sumsq: np.ndarray | None,
        nonfinite: np.ndarray,
    ) -> None:
        """Redoes in float64 the torch-op sums where a float32 square may have under- or
        overflowed, and counts non-finite gradient values (the kernels' sums are exact)."""
        assert self._flat is not None
        present = pending["present"]
        numel = np.array([self._local(i).numel() for i in present])
        for k in np.flatnonzero(stats.needs_exact(grad_sumsq, numel)):
            grad = _strided(self._as_local(self._params[present[k]][1].grad))  # type: ignore[arg-type]
            grad_sumsq[k] = float(stats.exact_norm(grad)) ** 2
            if not np.isfinite(grad_sumsq[k]):
                nonfinite[k] = stats.count_nonfinite(grad)
        for k in np.flatnonzero(stats.needs_exact(param_sumsq, numel)):
            param_sumsq[k] = float(stats.exact_norm(self._flat.before(present[k]))) ** 2  # type: ignore[arg-type]
        if update_sumsq is not None:
            for k in np.flatnonzero(stats.needs_exact(update_sumsq, numel)):
                diff = self._local(present[k]) - self._flat.before(present[k])  # type: ignore[operator]
                update_sumsq[k] = float(stats.exact_norm(diff)) ** 2

    # -- results ---------------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        """All recorded steps as one long-form frame: step, layer, kind, stat, value."""
        held = _frame(self._rows, self._layouts)
        if not self._parts:
            return held
        spilled = [pd.read_parquet(part) for part in self._parts]
        return pd.concat([*spilled, held] if len(held) else spilled, ignore_index=True)

    @property
    def rows_held(self) -> int:
        """Rows held in memory (not yet spilled)."""
        return self._rows_held

    def _check_spill_dir(self, directory: Path) -> None:
        if directory.exists() and not directory.is_dir():
            raise RecorderError(f"spill_to={str(directory)!r} is a file, not a directory")
        if directory.is_dir() and any(directory.glob("part-*.parquet")):
            raise RecorderError(
                f"spill_to={str(directory)!r} already holds another recording's parts; "
                "give each recording its own directory"
            )

    def _spill(self) -> None:
        """Writes the rows held in memory to the next Parquet part and forgets them."""
        if self.spill_to is None:
            return
        self.spill_to.mkdir(parents=True, exist_ok=True)
        path = self.spill_to / f"part-{len(self._parts):06d}.parquet"
        frame = _frame(self._rows, self._layouts)
        atomic_write(path, lambda p: frame.to_parquet(p, index=False))
        self._parts.append(path)
        self._rows.clear()
        self._rows_held = 0

    def diagnose(self) -> list[Any]:
        """Verdicts over everything recorded so far (see gradscope.diagnose)."""
        from gradscope.diagnose import diagnose

        return diagnose(self.to_frame())


def _frame(steps: list[tuple[int, int, np.ndarray]], layouts: list[_Layout]) -> pd.DataFrame:
    """Held steps (step, layout index, values) as one long-form frame."""
    if not steps:
        return pd.DataFrame(
            {
                "step": pd.Series(dtype="int64"),
                "layer": pd.Series(dtype=object),
                "kind": pd.Series(dtype=object),
                "stat": pd.Series(dtype=object),
                "value": pd.Series(dtype="float64"),
            }
        )
    used = [layouts[i] for _, i, _ in steps]
    return pd.DataFrame(
        {
            "step": np.repeat([s for s, _, _ in steps], [len(v) for _, _, v in steps]),
            "layer": np.concatenate([u.layer for u in used]),
            "kind": np.concatenate([u.kind for u in used]),
            "stat": np.concatenate([u.stat for u in used]),
            "value": np.concatenate([v for _, _, v in steps]),
        }
    )


@dataclass(frozen=True)
class _Layout:
    """The layer, kind and stat of each row of a step: shared by steps that record the same."""

    layer: np.ndarray
    kind: np.ndarray
    stat: np.ndarray
    blocks: list[tuple[list[str], str, list[str]]]  # as _Rows.add received them


class _Rows:
    """One step's rows as column blocks, turned into a layout and a value vector at the end."""

    __slots__ = ("blocks", "values")

    def __init__(self) -> None:
        self.blocks: list[tuple[list[str], str, list[str]]] = []
        self.values: list[np.ndarray] = []

    def add(
        self, layers: Sequence[str], kind: str, stat: str | Sequence[str], values: np.ndarray
    ) -> None:
        values = np.asarray(values, dtype=np.float64)
        stat_column = [stat] * len(values) if isinstance(stat, str) else list(stat)
        self.blocks.append((list(layers), kind, stat_column))
        self.values.append(values)

    def finish(self, previous: _Layout | None) -> tuple[_Layout, np.ndarray]:
        """The step's layout (`previous` itself where it is the same) and its values."""
        values = np.concatenate(self.values) if self.values else np.zeros(0, dtype=np.float64)
        if previous is not None and previous.blocks == self.blocks:  # the usual case: cheap
            return previous, values
        as_array = functools.partial(np.asarray, dtype=object)
        layer = [name for block in self.blocks for name in block[0]]
        kind = [block[1] for block in self.blocks for _ in block[0]]
        stat = [name for block in self.blocks for name in block[2]]
        return _Layout(as_array(layer), as_array(kind), as_array(stat), self.blocks), values


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

    def rows(self) -> np.ndarray:
        return self._table[: self._used]

    def reset(self) -> None:
        self._used = 0


class _Reader:
    """Reads consecutive slices of the step's one host vector."""

    def __init__(self, flat: np.ndarray) -> None:
        self.flat, self.offset = flat, 0

    def take(self, n: int) -> np.ndarray:
        out = self.flat[self.offset : self.offset + n]
        self.offset += n
        return out


class _LabelIndex:
    """Unique labels in first-seen order, and each call's index into them. The last answer
    is kept: consecutive recorded steps usually make the same calls."""

    def __init__(self) -> None:
        self._labels: list[str] | None = None
        self._answer: tuple[list[str], np.ndarray] = ([], np.zeros(0, dtype=np.int64))

    def __call__(self, labels: list[str]) -> tuple[list[str], np.ndarray]:
        if labels != self._labels:
            index: dict[str, int] = {}
            ids = [index.setdefault(label, len(index)) for label in labels]
            self._labels, self._answer = labels, (list(index), np.array(ids, dtype=np.int64))
        return self._answer


def _stack_float64(parts: list[torch.Tensor]) -> torch.Tensor:
    """Stacks equal-shape tensors of possibly mixed float dtypes into one float64 tensor."""
    if all(p.dtype == parts[0].dtype for p in parts):
        return torch.stack(parts).to(torch.float64)
    return torch.stack([p.to(torch.float64) for p in parts])


def _cat_float64(parts: list[torch.Tensor]) -> torch.Tensor:
    if all(p.dtype == parts[0].dtype for p in parts):
        return torch.cat(parts).to(torch.float64)
    return torch.cat([p.to(torch.float64) for p in parts])


class _RecorderHook:
    """A forward pre-hook that knows its recorder, so a second recorder can be detected."""

    __slots__ = ("recorder", "fn")

    def __init__(self, recorder: Recorder, fn: Callable[..., None]) -> None:
        self.recorder = recorder
        self.fn = fn

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.fn(module, args)


def _has_recorder(model: nn.Module) -> bool:
    return any(
        isinstance(hook, _RecorderHook) and hook.recorder.attached
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
    )


def _no_op(module: nn.Module, args: Any) -> None:
    return None


def _band(module: nn.Module) -> tuple[float, float] | None:
    """The saturation band of a bounded activation module's outputs, else None."""
    bounds = stats.activation_bounds(module)
    return stats.saturation_band(bounds) if bounds is not None else None


def _strided(grad: torch.Tensor) -> torch.Tensor:
    """A sparse gradient (nn.Embedding(sparse=True)) as the dense tensor it stands for."""
    return grad if grad.layout == torch.strided else grad.to_dense()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


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
