"""Module-output statistics inside compiled graphs (torch.compile): hooks that dynamo traces.

Dynamo traces forward hooks into the graph only if they are registered before the model is
compiled for the first time (hooks added later are not seen: `skip_nnmodule_hook_guards`),
and it would recompile for every hook added or removed. So on a compiled model each watched
module gets one permanent hook, gated by a flag that dynamo guards on: a recorded step runs
the graph traced with statistics, other steps the graph traced without (two graphs in all,
whatever `every` is). Statistics leave the graph without any Python side effect:

- forward: each output's float64 moments are folded into a row of its module's `accs`
  tensor, which the graph updates in place (AOTAutograd writes the mutation back);
- backward: the output passes through `Tap`, an identity whose backward returns the
  gradient unchanged and, as the gradient of a row of its module's `probes` leaf, that
  gradient's float64 sums. They accumulate in the leaf's .grad, read when the step closes;
  with a GradScaler a hook on the leaf takes each backward apart, with its own scale.

Each module has `OUTPUTS_PER_MODULE` rows; floating-point outputs beyond them are not
recorded. Calls of one module within a step add up in its rows, as the eager path's calls
are merged per layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradscope import stats
from gradscope.recorder.stats import units

OUTPUTS_PER_MODULE = 8
# an acc row: the eager path's ACT_FIELDS, then the count of values and of saturated values
ACC_WIDTH = len(stats.ROW_FIELDS)
PROBE_WIDTH = len(stats.GRAD_ROW_FIELDS)  # GRAD_FIELDS, then the samples


class Tap(torch.autograd.Function):
    """y = x; in backward, dL/dprobe = the float64 sums of dL/dy (stats.grad_row)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        ctx.probe_device = probe.device
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, stats.grad_row(grad).to(ctx.probe_device)


class GraphTaps:
    """The hooks of a compiled model's watched modules and the tensors their statistics
    leave the graph in (one small pair per module, so that each output's statistics are
    written where nothing else is); read once per recorded step."""

    def __init__(
        self,
        modules: list[tuple[str, nn.Module, tuple[float, float] | None]],
        device: torch.device,
        outputs: bool,
        grads: bool,
        on_backward: Callable[[int, torch.Tensor], None] | None,
    ) -> None:
        self.on = False  # read by the traced hooks: dynamo guards on it
        self.outputs, self.grads = outputs, grads
        self.labels = [label for label, _, _ in modules]
        self.bands = [band for _, _, band in modules]
        first = units.channel_first([(label, module) for label, module, _ in modules])
        self.channel_first = [label in first for label in self.labels]
        shape = (OUTPUTS_PER_MODULE, ACC_WIDTH)
        self.accs = [torch.zeros(shape, dtype=torch.float64, device=device) for _ in modules]
        self.probes = [
            torch.zeros(
                OUTPUTS_PER_MODULE, PROBE_WIDTH, dtype=torch.float64, device=device,
                requires_grad=grads,
            )
            for _ in modules
        ]  # fmt: skip
        self._empty = torch.zeros(ACC_WIDTH, dtype=torch.float64)
        self._empty[stats.ROW_FIELDS.index("min")] = math.inf
        self._empty[stats.ROW_FIELDS.index("max")] = -math.inf
        self._empty[stats.ROW_FIELDS.index("dead_units")] = math.inf  # merged by min
        self._empty[stats.ROW_FIELDS.index("units")] = -math.inf  # by max
        self._empty = self._empty.to(device).expand(shape)
        # labels of structured outputs (fqn[i], fqn[key]), written by the traced hooks
        self.names: dict[tuple[int, int], str] = {}
        self._handles: list[RemovableHandle] = []
        for m, (_, module, band) in enumerate(modules):
            hook = functools.partial(self._forward, m, band)
            self._handles.append(module.register_forward_hook(hook))
            if grads and on_backward is not None:  # each backward apart (GradScaler scales)
                self._handles.append(
                    self.probes[m].register_hook(functools.partial(on_backward, m))
                )
        self.per_backward = grads and on_backward is not None
        # per row: whether its module is bounded (tanh, sigmoid): saturation is counted
        self.bounded = np.repeat([b is not None for b in self.bands], OUTPUTS_PER_MODULE)
        self._slot_labels: dict[tuple[bytes, int], list[str]] = {}
        self._written = True  # the rows may hold values: reset() empties them
        self.reset()

    # -- the traced side ---------------------------------------------------------------------

    def _forward(
        self, m: int, band: tuple[float, float] | None, module: nn.Module, args: Any, out: Any
    ) -> Any:
        if not self.on or not torch.is_grad_enabled():
            return None
        if isinstance(out, torch.Tensor):
            return self._tap(m, 0, band, out) if out.is_floating_point() else None
        return self._walk(out, m, band, self.labels[m], [0])

    def _walk(
        self, out: Any, m: int, band: tuple[float, float] | None, name: str, seen: list[int]
    ) -> Any:
        """The output with each floating-point tensor tapped (tuples and lists rebuilt,
        mappings changed in place), labelled as the eager path labels them."""
        if isinstance(out, torch.Tensor):
            if not out.is_floating_point() or seen[0] >= OUTPUTS_PER_MODULE:
                return out
            j = seen[0]
            seen[0] += 1
            self.names[(m, j)] = name
            return self._tap(m, j, band, out)
        if isinstance(out, tuple | list):
            items = [self._walk(x, m, band, f"{name}[{i}]", seen) for i, x in enumerate(out)]
            if isinstance(out, list):
                return items
            return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
        if isinstance(out, MutableMapping):
            for key in list(out.keys()):
                out[key] = self._walk(out[key], m, band, f"{name}[{key}]", seen)
            return out
        if isinstance(out, Mapping):  # read-only: statistics without the backward tap
            for key, item in out.items():
                if isinstance(item, torch.Tensor):
                    self._walk(item.detach(), m, band, f"{name}[{key}]", seen)
        return out

    def _tap(
        self, m: int, j: int, band: tuple[float, float] | None, out: torch.Tensor
    ) -> torch.Tensor:
        if self.outputs:
            acc = self.accs[m]
            with torch.no_grad():
                axis = units.unit_axis(out.dim(), self.channel_first[m])
                row = stats.output_row(out, band, axis).to(acc.device)
                acc[j].copy_(stats.fold_rows(acc[j], row))
        if self.grads and out.requires_grad:
            return Tap.apply(out, self.probes[m][j])
        return out

    # -- the host side -----------------------------------------------------------------------

    def arm(self, on: bool) -> None:
        self.on = on
        self._written = self._written or on

    @property
    def armed(self) -> bool:
        return self.on

    def reset(self) -> None:
        """Empties the rows for a new step (on the device, no host sync); nothing to do after
        steps the graphs ran without statistics."""
        if not self._written:
            return
        self._written = False  # until arm(True): only armed graphs write
        with torch.no_grad():
            torch._foreach_copy_(self.accs, [self._empty] * len(self.accs))
        for probe in self.probes:
            probe.grad = None

    def slot_labels(self, slots: np.ndarray) -> list[str]:
        """The label of each row (module * OUTPUTS_PER_MODULE + output); kept while the rows
        seen and the names of structured outputs stay the same, as they do step after step."""
        key = (slots.tobytes(), len(self.names))
        labels = self._slot_labels.get(key)
        if labels is None:
            labels = [
                self.names.get(divmod(s, OUTPUTS_PER_MODULE), self.labels[s // OUTPUTS_PER_MODULE])
                for s in slots.tolist()
            ]
            if len(self._slot_labels) > 64:  # the rows seen keep changing: forget old ones
                self._slot_labels.clear()
            self._slot_labels[key] = labels
        return labels

    def device_parts(self, backwards: list[torch.Tensor]) -> list[torch.Tensor]:
        """What comes to the host: the output rows, and the output-gradient rows (of each
        backward where kept apart, else summed over the step's backwards)."""
        parts = [torch.stack(self.accs)] if self.outputs else []
        if self.grads and self.per_backward:
            parts += backwards
        elif self.grads:
            zero = torch.zeros_like(self.probes[0])
            parts.append(torch.stack([p.grad if p.grad is not None else zero for p in self.probes]))
        return parts

    def remove(self) -> None:
        self.on = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def compiled_parts(model: nn.Module) -> bool:
    """Whether the model or a module inside it runs compiled: torch.compile(module) wraps it
    (OptimizedModule), module.compile() compiles it in place."""
    return any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None)
        for m in model.modules()
    )


def make_dynamo_see_hooks(model: nn.Module) -> None:
    """Makes dynamo trace the hooks about to be registered on `model`: its guards on module
    hooks turned on (process-wide), and the graphs cached for the model dropped.

    Graphs are shared by models of one architecture (modules are inlined, not guarded on by
    identity), and by default their guards skip hooks: an unwatched twin's graph, without the
    statistics, would then run for the watched model. A model that has already run compiled
    has graphs traced without the hooks; dynamo keys them on code objects, and nn.Module's
    call is one code object for every module, so other compiled modules of the process are
    traced again too (once).
    """
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    codes = {nn.Module._wrapped_call_impl.__code__, nn.Module._call_impl.__code__}
    for m in model.modules():
        # what torch.compile(m) (its forward) or m.compile() (_compiled_call_impl) compiled
        for wrapper in (getattr(m, "forward", None), getattr(m, "_compiled_call_impl", None)):
            compiled = getattr(wrapper, "_torchdynamo_orig_callable", None)
            code = getattr(getattr(compiled, "__func__", compiled), "__code__", None)
            if code is not None:
                codes.add(code)
        forward = getattr(type(m), "forward", None)
        if forward is not None and hasattr(forward, "__code__"):
            codes.add(forward.__code__)  # a frame of its own after a graph break
    for code in codes:
        if _debug_get_cache_entry_list(code):
            reset_code(code)
