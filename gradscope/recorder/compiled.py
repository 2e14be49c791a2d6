"""Module-output statistics inside compiled graphs (torch.compile): hooks that dynamo traces.

Dynamo traces forward hooks into the graph only if they are registered before the model is
compiled for the first time (hooks added later are not seen: `skip_nnmodule_hook_guards`),
and it would recompile for every hook added or removed. So on a compiled model each watched
module gets one permanent hook, gated by a flag that dynamo guards on: a recorded step runs
the graph traced with statistics, other steps the graph traced without (two graphs in all,
whatever `every` is). Statistics leave the graph without any Python side effect:

- forward: each output's float64 moments are folded into a row of `acc`, a small float64
  tensor that the graph updates in place (AOTAutograd writes the mutation back);
- backward: the output passes through `Tap`, an identity whose backward returns the
  gradient unchanged and, as the gradient of a `probe` leaf, that gradient's float64 sums.
  The probe's hook receives them once per backward (so each backward keeps its GradScaler
  scale); the values are ordinary gradients, so they fuse with the backward kernels.

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
    leave the graph in; read once per recorded step."""

    def __init__(
        self,
        modules: list[tuple[str, nn.Module, tuple[float, float] | None]],
        device: torch.device,
        outputs: bool,
        grads: bool,
        on_backward: Callable[[torch.Tensor], None],
    ) -> None:
        self.on = False  # read by the traced hooks: dynamo guards on it
        self.outputs, self.grads = outputs, grads
        self.labels = [label for label, _, _ in modules]
        self.bands = [band for _, _, band in modules]
        slots = len(modules) * OUTPUTS_PER_MODULE
        self.acc = torch.zeros(slots, ACC_WIDTH, dtype=torch.float64, device=device)
        self.probe = torch.zeros(
            slots, PROBE_WIDTH, dtype=torch.float64, device=device, requires_grad=grads
        )
        # labels of structured outputs (fqn[i], fqn[key]), written by the traced hooks
        self.names: dict[int, str] = {}
        self._handles: list[RemovableHandle] = []
        if grads:
            self._handles.append(self.probe.register_hook(self._backward))
        self._on_backward = on_backward
        for m, (_, module, band) in enumerate(modules):
            hook = functools.partial(self._forward, m * OUTPUTS_PER_MODULE, band)
            self._handles.append(module.register_forward_hook(hook))
        self.reset()

    # -- the traced side ---------------------------------------------------------------------

    def _forward(
        self, base: int, band: tuple[float, float] | None, module: nn.Module, args: Any, out: Any
    ) -> Any:
        if not self.on or not torch.is_grad_enabled():
            return None
        if isinstance(out, torch.Tensor):
            return self._tap(base, band, out) if out.is_floating_point() else None
        seen = [0]
        return self._walk(out, base, band, self.labels[base // OUTPUTS_PER_MODULE], seen)

    def _walk(
        self, out: Any, base: int, band: tuple[float, float] | None, name: str, seen: list[int]
    ) -> Any:
        """The output with each floating-point tensor tapped (tuples and lists rebuilt,
        mappings changed in place), labelled as the eager path labels them."""
        if isinstance(out, torch.Tensor):
            if not out.is_floating_point() or seen[0] >= OUTPUTS_PER_MODULE:
                return out
            slot = base + seen[0]
            seen[0] += 1
            self.names[slot] = name
            return self._tap(slot, band, out)
        if isinstance(out, tuple | list):
            items = [self._walk(x, base, band, f"{name}[{i}]", seen) for i, x in enumerate(out)]
            if isinstance(out, list):
                return items
            return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
        if isinstance(out, MutableMapping):
            for key in list(out.keys()):
                out[key] = self._walk(out[key], base, band, f"{name}[{key}]", seen)
            return out
        if isinstance(out, Mapping):  # read-only: statistics without the backward tap
            for key, item in out.items():
                if isinstance(item, torch.Tensor):
                    self._walk(item.detach(), base, band, f"{name}[{key}]", seen)
        return out

    def _tap(self, slot: int, band: tuple[float, float] | None, out: torch.Tensor) -> torch.Tensor:
        if self.outputs:
            with torch.no_grad():
                row = stats.output_row(out, band).to(self.acc.device)
                self.acc[slot] = stats.fold_rows(self.acc[slot], row)
        if self.grads and out.requires_grad:
            return Tap.apply(out, self.probe[slot])
        return out

    # -- the host side -----------------------------------------------------------------------

    def _backward(self, grad: torch.Tensor) -> None:
        self._on_backward(grad.detach())

    def arm(self, on: bool) -> None:
        self.on = on

    @property
    def armed(self) -> bool:
        return self.on

    def reset(self) -> None:
        """Empties the rows for a new step (on the device, no host sync)."""
        with torch.no_grad():
            self.acc.copy_(self._empty_rows())
        self.probe.grad = None

    def _empty_rows(self) -> torch.Tensor:
        empty = torch.zeros(ACC_WIDTH, dtype=torch.float64)
        empty[stats.ROW_FIELDS.index("min")] = math.inf
        empty[stats.ROW_FIELDS.index("max")] = -math.inf
        return empty.to(self.acc.device).expand_as(self.acc)

    def label(self, slot: int) -> str:
        return self.names.get(slot, self.labels[slot // OUTPUTS_PER_MODULE])

    def band(self, slot: int) -> tuple[float, float] | None:
        return self.bands[slot // OUTPUTS_PER_MODULE]

    def output_rows(self, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The slots that saw an output this step, and their rows."""
        used = np.flatnonzero(acc[:, stats.ROW_FIELDS.index("count")] > 0)
        return used, acc[used]

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


def forget_compiled_code(model: nn.Module) -> bool:
    """Drops dynamo's cached graphs of a model that has already run compiled, so that the
    next call traces the hooks just registered; True if there were any.

    Dynamo keys its cache on code objects, and nn.Module's call is one code object for every
    module: other compiled modules of the process are traced again too (once).
    """
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code

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
    dropped = False
    for code in codes:
        if _debug_get_cache_entry_list(code):
            reset_code(code)
            dropped = True
    return dropped
