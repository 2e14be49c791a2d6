"""Where the recorder looks: which modules are watched, the hooks on their outputs and on the
outputs' gradients, and a weak registry of watched models (one recorder per model unless
asked). Every registration is kept as a removable handle."""

from __future__ import annotations

import fnmatch
import functools
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None

# model -> the recorders attached to it; entries vanish with their model
_WATCHED: weakref.WeakKeyDictionary[nn.Module, list[object]] = weakref.WeakKeyDictionary()


def register(model: nn.Module, recorder: object) -> None:
    _WATCHED.setdefault(model, []).append(recorder)


def unregister(model: nn.Module, recorder: object) -> None:
    recorders = _WATCHED.get(model, [])
    if recorder in recorders:
        recorders.remove(recorder)
    if not recorders:
        _WATCHED.pop(model, None)


def is_watched(model: nn.Module) -> bool:
    """Whether a recorder is attached to this model or to a module inside it."""
    return any(module in _WATCHED for module in model.modules())


def matches(selector: Selector, fqn: str, module: nn.Module) -> bool:
    if selector is None:
        return False
    if callable(selector):
        return bool(selector(fqn, module))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    return any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


def watched(
    include: Selector, exclude: Selector, fqn: str, module: nn.Module, blocks: set[str]
) -> bool:
    """Whether a module's outputs are recorded: by default each leaf and each block (see
    block_fqns); with `include`, the modules it matches, leaf or composite."""
    if include is None:
        chosen = next(module.children(), None) is None or fqn in blocks
    else:
        chosen = matches(include, fqn, module)
    return chosen and not matches(exclude, fqn, module)


def param_selected(include: Selector, exclude: Selector, owner: str, model: nn.Module) -> bool:
    """Whether the parameters of module `owner` are recorded: those of every module the
    selection covers (a selected composite module covers its submodules' parameters), unless
    `exclude` matches their own module."""
    module = model.get_submodule(owner) if owner else model
    if matches(exclude, owner, module):
        return False
    if include is None:
        return True
    parts = owner.split(".") if owner else []
    prefixes = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]  # owner ... root
    return any(matches(include, p, model.get_submodule(p)) for p in prefixes)


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


def tensor_outputs(output: Any, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    """Each floating-point tensor in a module's output, labelled fqn, fqn[i] or fqn[key]."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield prefix, output
    elif isinstance(output, tuple | list):
        for i, item in enumerate(output):
            yield from tensor_outputs(item, f"{prefix}[{i}]")
    elif isinstance(output, Mapping):
        for key, item in output.items():
            yield from tensor_outputs(item, f"{prefix}[{key}]")


OutputFn = Callable[[str, tuple[float, float] | None, torch.Tensor], None]
GradFn = Callable[[str, torch.Tensor], None]


class OutputHooks:
    """Forward hooks on the watched modules, armed for recorded steps only (steps that are not
    recorded run none), and a gradient hook on each output they see."""

    def __init__(
        self,
        modules: list[tuple[str, nn.Module, tuple[float, float] | None]],
        on_output: OutputFn | None,
        on_grad: GradFn | None,
    ) -> None:
        self._on_output, self._on_grad = on_output, on_grad
        self._hooks = [
            (module, functools.partial(self._forward, label, band))
            for label, module, band in modules
        ]
        self._handles: list[RemovableHandle] = []

    def arm(self, on: bool) -> None:
        if on and not self._handles and (self._on_output or self._on_grad):
            self._handles = [module.register_forward_hook(hook) for module, hook in self._hooks]
        elif not on:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    @property
    def records(self) -> tuple[bool, bool]:
        """Whether outputs and whether their gradients are recorded."""
        return self._on_output is not None, self._on_grad is not None

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def _forward(
        self, label: str, band: tuple[float, float] | None, module: nn.Module, args: Any, out: Any
    ) -> None:
        if not torch.is_grad_enabled():  # evaluation passes are not recorded
            return
        if isinstance(out, torch.Tensor):  # the common case, without the generator
            if out.is_floating_point():
                self._observe(label, band, out)
            return
        for name, tensor in tensor_outputs(out, label):
            self._observe(name, band, tensor)

    def _observe(self, label: str, band: tuple[float, float] | None, tensor: torch.Tensor) -> None:
        if self._on_output is not None:
            self._on_output(label, band, tensor)
        if self._on_grad is not None and tensor.requires_grad:
            node = tensor.grad_fn
            if node is None:  # a leaf: a tensor hook
                tensor.register_hook(functools.partial(self._on_grad, label))
            else:  # cheaper, and the same gradient: a pre-hook on the node that made it
                node.register_prehook(functools.partial(self._node_grads, label, tensor.output_nr))

    def _node_grads(self, label: str, output_nr: int, grads: tuple[Any, ...]) -> None:
        grad = grads[output_nr]
        if grad is not None and self._on_grad is not None:
            self._on_grad(label, grad)
