"""One step's calls as typed records: module outputs, output gradients, parameter reads,
GradScaler scales and logged scalars, held until the step closes; then the step's one
host transfer and each call's statistics in the backends' common schema."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from gradscope.recorder.compiled import GraphTaps
from gradscope.recorder.stats import torch_ops as stats
from gradscope.recorder.stats.backends import Backend, Backends, Reader, exact_param_values
from gradscope.recorder.stats.fields import GRAD, OUTPUT
from gradscope.recorder.stats.flat import ParamValues
from gradscope.recorder.stats.transfer import StepTransfer, TransferPool
from gradscope.recorder.stats.units import unit_axis, unit_shape

_OUTPUT_WIDTH, _GRAD_WIDTH = len(OUTPUT), len(GRAD)


class OutputCall(NamedTuple):
    """One module output seen in forward."""

    label: str
    numel: int
    backend: Backend | GraphTaps  # where its row is (compared by identity)


class GradCall(NamedTuple):
    """One output gradient seen in backward."""

    label: str
    samples: int
    backend: Backend | GraphTaps
    # index into the step's GradScaler scales: the scale of the forward this backward
    # belongs to (-1: no scaler, or no forward seen; the scale at the step's end is used)
    scale: int


# a statistic on its way to the host: a tensor on the device, or already a float64 host array
# (what the C kernels return)
Part = torch.Tensor | np.ndarray


class ParamRead(NamedTuple):
    """A step's parameter statistics (on the device until collected, or host arrays from the
    C kernels): read before the update, or, where a pre-update copy was kept, after it, in
    the same pass as the update (params.py)."""

    present: list[int]  # indices of the parameters that had a gradient
    snapshot: bool  # a pre-update copy was kept, so the update can be measured
    values: ParamValues | None  # None until read
    numel: np.ndarray | None = None  # each present parameter's size (torch ops: exact_sumsq)


@dataclass
class Tables:
    """A closed step's per-call statistics on the host, each in the common schema."""

    outputs: list[OutputCall]
    output_stats: np.ndarray  # (calls, fields.OUTPUT)
    saturated: list[tuple[int, float]]  # (output call, values in the saturation band)
    grads: list[GradCall]
    grad_stats: np.ndarray  # (calls, fields.GRAD), unscaled
    params: ParamRead | None
    param_values: ParamValues | None = None  # as ParamRead.values, on the host
    update_sumsq: np.ndarray | None = None
    update_dot: np.ndarray | None = None  # update . gradient, per present parameter
    state_sumsq: np.ndarray | None = None  # the optimizer's second moment (NaN: none)
    scalars: list[tuple[str, float]] = field(default_factory=list)
    # each output's element count and each gradient's sample count, once the call lists are
    # let go (hold()); until then they are read from the calls
    numel: np.ndarray | None = None
    samples: np.ndarray | None = None

    def output_numel(self) -> np.ndarray:
        if self.numel is not None:
            return self.numel
        return np.array([c.numel for c in self.outputs], dtype=np.float64)

    def grad_samples(self) -> np.ndarray:
        if self.samples is not None:
            return self.samples
        return np.array([c.samples for c in self.grads], dtype=np.float64)

    def hold(self, first: Tables) -> None:
        """Keeps this step's numbers but shares its calls with `first`, an earlier step that
        made the same calls (deferred.py holds many such steps): a held step then keeps a few
        Python objects instead of one per call, and the garbage collector, which would
        otherwise promote them all and run full collections (~0.15 s each), has little to
        look at."""
        self.numel, self.samples = self.output_numel(), self.grad_samples()
        self.outputs, self.grads, self.params = first.outputs, first.grads, first.params


class StepCapture:
    """Everything one recorded step has seen so far."""

    def __init__(self) -> None:
        self.backends = Backends()
        # the statistics a compiled model's graphs computed (None: an eager model)
        self.graph: GraphTaps | None = None
        self._transfers = TransferPool()  # host buffers for the steps' one transfer each
        # labels of the watched modules whose 3-d outputs have their units on dim 1 (set at
        # attach: units.channel_first)
        self._channel_first: frozenset[str] = frozenset()
        # (label, output shape) -> the output as (outer, units, inner): decided once, not at
        # every call (a recorded step of a deep stack makes hundreds)
        self._unit_shapes: dict[tuple[str, torch.Size], tuple[int, int, int]] = {}
        self.reset()

    @property
    def channel_first(self) -> frozenset[str]:
        return self._channel_first

    @channel_first.setter
    def channel_first(self, labels: frozenset[str]) -> None:
        self._channel_first = labels
        self._unit_shapes.clear()

    def reset(self) -> None:
        self.backends.reset()
        if self.graph is not None:
            self.graph.reset()
        # with a GradScaler, each backward's output-gradient rows of one module from the
        # graphs: (module index, its scale's index, rows)
        self.graph_grads: list[tuple[int, int, torch.Tensor]] = []
        self.outputs: list[OutputCall] = []
        self.saturated: list[tuple[int, torch.Tensor]] = []
        self.grads: list[GradCall] = []
        # the GradScaler's scale at each recorded forward, as device tensors (no host sync):
        # a step the scaler skips merges into the next, and each backward's gradients must be
        # divided by the scale it was made with, not by the next step's
        self.scales: list[torch.Tensor] = []
        self.params: ParamRead | None = None
        self.scalars: list[tuple[str, torch.Tensor | float]] = []
        # the tensor of the last output call and of the last gradient call, its version
        # counter then, and the backend that took it (and the output's unit shape)
        self._last_output: tuple[torch.Tensor | None, int | None, Any, tuple[int, ...] | None] = (
            None, None, None, None,
        )  # fmt: skip
        self._last_grad: tuple[torch.Tensor | None, int | None, Any] = (None, None, None)

    def output(self, label: str, band: tuple[float, float] | None, tensor: torch.Tensor) -> None:
        numel = tensor.numel()
        key = (label, tensor.shape)
        shape = self._unit_shapes.get(key)
        if shape is None:
            if len(self._unit_shapes) > 4096:  # shapes that vary (sequence lengths)
                self._unit_shapes.clear()
            ndim = tensor.dim()
            first = ndim == 3 and label.partition("[")[0] in self._channel_first
            shape = self._unit_shapes[key] = unit_shape(tensor.shape, unit_axis(ndim, first))
        last = self._last_output
        if last[0] is tensor and last[1] == version(tensor) is not None and last[3] == shape:
            # the very tensor the last call saw, unchanged (a block's output is its last
            # layer's): the same statistics, copied instead of computed again
            backend = last[2]
            backend.repeat_moments()
        else:
            backend = self.backends.for_tensor(tensor) if numel else self.backends.torch
            backend.moments(tensor, shape)
            self._last_output = (tensor, version(tensor), backend, shape)
        if band is not None:
            self.saturated.append((len(self.outputs), backend.saturated(tensor, band)))
        self.outputs.append(OutputCall(label, numel, backend))

    def grad(self, label: str, grad: torch.Tensor) -> None:
        samples = 1 if grad.dim() == 0 else grad.shape[0]
        last = self._last_grad
        if last[0] is grad and last[1] == version(grad) is not None:  # as in output()
            backend = last[2]
            backend.repeat_grad()
        else:
            backend = self.backends.for_tensor(grad)
            backend.grad(grad, samples)
            self._last_grad = (grad, version(grad), backend)
        self.grads.append(GradCall(label, samples, backend, len(self.scales) - 1))

    def graph_backward(self, module: int, rows: torch.Tensor) -> None:
        """One backward's output-gradient rows of a module (its GraphTaps probe's gradient)."""
        # a copy: autograd keeps this very tensor as the probe's .grad and adds the next
        # backward's rows into it in place
        self.graph_grads.append((module, len(self.scales) - 1, rows.detach().clone()))

    def scale(self, scaler: Any) -> None:
        """Keeps the scaler's current scale for the backward of the forward now starting."""
        scale = scaler._get_scale_async()  # None until the scaler's first scale()
        if scale is None:
            self.scales.append(torch.tensor([float(scaler.get_scale())]))
        else:
            self.scales.append(scale.detach().reshape(1).clone())

    def empty(self) -> bool:
        graph = self.graph is not None and self.graph.armed
        return not (self.outputs or self.grads or self.params or self.scalars or graph)

    def collect(
        self,
        updates: Part | None,
        scaler_scale: torch.Tensor | float | None,
        geometry: tuple[Part, Part] | None = None,
    ) -> PendingStep:
        """Starts the step's one transfer to the host (without waiting for the device) and
        returns what reads it back: per-call tables, and the scales of the step's backwards
        (None without a scaler)."""
        backends = self.backends.all
        parts: list[Part] = [part for backend in backends for part in backend.device_parts()]
        parts += [count for _, count in self.saturated]
        graph, backwards = self.graph, self.graph_grads
        if graph is not None:
            parts += graph.device_parts([rows for _, _, rows in backwards])
        grads_seen = self.grads or backwards
        scales = self.scales if grads_seen and scaler_scale is not None else []
        parts += scales
        # the scale at the step's end (for backwards of no forward seen), a device tensor read
        # with the rest: the scaler's update() changes it in place only after the join
        scale_now = scaler_scale.reshape(1) if isinstance(scaler_scale, torch.Tensor) else None
        if scale_now is not None:
            parts.append(scale_now)
        read = self.params
        param_parts = [v for v in read.values if v is not None] if read and read.values else []
        parts += param_parts
        if updates is not None:
            parts.append(updates)
        if geometry is not None:  # the update's dots with the gradients, second moments
            parts += geometry
        scalars = [torch.as_tensor(v, dtype=torch.float64).reshape(()) for _, v in self.scalars]
        parts += scalars
        # what the host needs to read the values back, kept: the capture is reset for the
        # next step before they are read
        decoders = [(id(b), b.decoder()) for b in backends]
        outputs, grads, saturated = self.outputs, self.grads, self.saturated
        names = [name for name, _ in self.scalars]
        device = [p for p in parts if isinstance(p, torch.Tensor)]

        def decode(reader: Reader) -> tuple[Tables, np.ndarray | None]:
            act_tables, grad_tables = {}, {}
            for key, decoder in decoders:
                act_tables[key], grad_tables[key] = decoder(reader)
            sat = reader.take(len(saturated))
            tables = Tables(
                outputs=outputs,
                output_stats=_in_call_order(outputs, act_tables, _OUTPUT_WIDTH),
                saturated=[(i, float(v)) for (i, _), v in zip(saturated, sat, strict=True)],
                grads=grads,
                grad_stats=_in_call_order(grads, grad_tables, _GRAD_WIDTH),
                params=read,
            )
            if graph is not None:
                _graph_tables(graph, backwards, reader, tables)
            scale_values = reader.take(len(scales))
            now = float(reader.take(1)[0]) if scale_now is not None else scaler_scale
            values = None
            if read is not None and read.values is not None:
                got = iter([reader.part(p) for p in param_parts])
                values = ParamValues(*(next(got) if v is not None else None for v in read.values))
            update = reader.part(updates) if updates is not None else None
            if read is not None and values is not None:
                tables.param_values, update = exact_param_values(values, update, read.numel)
            tables.update_sumsq = update
            if geometry is not None:
                tables.update_dot, tables.state_sumsq = (reader.part(g) for g in geometry)
            if scalars:
                tables.scalars = [
                    (name, float(v))
                    for name, v in zip(names, reader.take(len(scalars)), strict=True)
                ]
            if now is None:
                return tables, None
            per_call = np.array(
                [scale_values[g.scale] if g.scale >= 0 else now for g in tables.grads]
            )
            return tables, per_call

        return PendingStep(self._transfers.start(device) if device else None, decode)


class PendingStep:
    """A closed step whose statistics are on their way to the host: `ready()` asks without
    waiting, `finish()` reads them (waiting where they have not arrived) into tables."""

    def __init__(
        self,
        transfer: StepTransfer | None,
        decode: Callable[[Reader], tuple[Tables, np.ndarray | None]],
    ) -> None:
        self._transfer, self._decode = transfer, decode

    def ready(self) -> bool:
        return self._transfer is None or self._transfer.ready()

    def finish(self) -> tuple[Tables, np.ndarray | None]:
        if self._transfer is None:
            return self._decode(Reader(np.zeros(0)))
        flat = self._transfer.values().copy()  # the tables keep slices of it
        self._transfer.release()
        return self._decode(Reader(flat))


def _graph_tables(
    graph: GraphTaps, backwards: list[tuple[int, int, torch.Tensor]], reader: Reader, tables: Tables
) -> None:
    """Adds the calls the compiled graphs recorded (one per module output and step; one per
    output gradient and backward with a GradScaler, else per step) to the step's tables."""
    if graph.outputs:
        out = graph.decode_outputs(reader)
        first = len(tables.outputs)
        tables.outputs = tables.outputs + [
            OutputCall(label, n, graph) for label, n in zip(out.labels, out.numel, strict=True)
        ]
        tables.output_stats = np.vstack([tables.output_stats, out.table])
        tables.saturated = tables.saturated + [(first + i, v) for i, v in out.saturated]
    if not graph.grads:
        return
    grads = graph.decode_grads(reader, backwards)
    if grads.labels:
        tables.grads = tables.grads + [
            GradCall(label, n, graph, k)
            for label, n, k in zip(grads.labels, grads.samples, grads.scale, strict=True)
        ]
        tables.grad_stats = np.vstack([tables.grad_stats, grads.table])


def _in_call_order(
    calls: list[OutputCall] | list[GradCall], tables: dict[int, np.ndarray], width: int
) -> np.ndarray:
    """Each backend's rows put back in the order the calls were made."""
    if not calls:
        return np.empty((0, width))
    first = calls[0].backend
    if all(c.backend is first for c in calls):  # one backend took every call
        return tables[id(first)]  # (each decoder's tables are its own: no copy)
    out = np.empty((len(calls), width))
    owner = np.array([id(c.backend) for c in calls])
    for key, table in tables.items():
        mine = owner == key
        if mine.any():
            out[mine] = table
    return out


def version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by each in-place change); None for inference
    tensors, which keep none (a module may pass one through): never taken as unchanged."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def band(module: torch.nn.Module) -> tuple[float, float] | None:
    """The saturation band of a bounded activation module's outputs, else None."""
    bounds = stats.activation_bounds(module)
    return stats.saturation_band(bounds) if bounds is not None else None


def strided(grad: torch.Tensor) -> torch.Tensor:
    """A sparse gradient (nn.Embedding(sparse=True)) as the dense tensor it stands for."""
    return grad if grad.layout == torch.strided else grad.to_dense()
