"""The optimizer's side of a step: read the gradients just before the update, close the step
after it. The optimizer is the one given, or the first found stepping the model's parameters
through torch's global optimizer step hooks (wherever a trainer creates it); an optimizer made
again over the model's parameters (each epoch, after model surgery) takes over from it."""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle


class OptimizerHooks:
    """Calls `before()` when the gradients an update will use are there and `after()` when
    the update is done, for one optimizer (the clock): `optimizer`, or else the first one
    found that steps any of the model's parameters.

    A new optimizer that steps every model parameter the clock steps (one made again each
    epoch, or after layers were replaced) takes over as the clock, with one note; a second
    optimizer over part of them (a split body/head) is warned about once; optimizers over
    other parameters are ignored.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        params: Callable[[], Iterable[torch.Tensor]],
        before: Callable[[], None],
        after: Callable[[], None],
    ) -> None:
        self.optimizer = optimizer
        self.searching = optimizer is None  # looking for (or following) one found
        self._before, self._after = before, after
        self._params = params  # the model's trainable parameters now (asked per new optimizer)
        self._checked: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._given = optimizer  # stepped through its own hooks; every other one globally
        self._warned: set[str] = set()
        if optimizer is not None:
            self._checked[optimizer] = True
        # the frame of torch's step wrapper running the update now, and how many steps run
        # inside it: a subclass whose step() calls super().step() runs the hooks again, inside
        # the first; the outermost step is the update
        self._outer: FrameType | None = None
        self._nested = 0
        # (the given optimizer keeps hooks of its own, registered after any the user added
        # before attach, as before; the global ones see optimizers made later)
        self.handles: list[RemovableHandle] = [
            register_optimizer_step_pre_hook(self._any_pre),
            register_optimizer_step_post_hook(self._any_post),
        ]
        if optimizer is not None:
            self.handles += [
                optimizer.register_step_pre_hook(self._given_pre),
                optimizer.register_step_post_hook(self._given_post),
            ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _given_pre(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        if optimizer is self.optimizer:
            return self._pre(optimizer, args, kwargs, sys._getframe(1))
        return None

    def _given_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer is self.optimizer:
            self._post(optimizer, args, kwargs)

    def _any_pre(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        if optimizer is self.optimizer:
            if optimizer is self._given:
                return None  # its own hooks follow it
            return self._pre(optimizer, args, kwargs, sys._getframe(1))
        if optimizer in self._checked:  # seen before: not ours, or let go
            return None
        self._checked[optimizer] = True
        ours = {id(p) for p in self._params()}
        steps = {id(p) for g in optimizer.param_groups for p in g["params"]} & ours
        if not steps:
            return None
        if self.optimizer is None:  # the first optimizer over the model's parameters
            self.optimizer = optimizer
            return self._pre(optimizer, args, kwargs, sys._getframe(1))
        clock = {id(p) for g in self.optimizer.param_groups for p in g["params"]} & ours
        if clock <= steps:  # made again over the same parameters: it is the clock now
            self._note(
                "new",
                f"gradscope: a new {type(optimizer).__name__} steps this model's parameters; "
                f"it closes the steps from now on, in place of the "
                f"{type(self.optimizer).__name__} before it (an optimizer made again over the "
                "model's parameters always takes over; noted once)",
            )
            self.optimizer, self._outer, self._nested = optimizer, None, 0
            return self._pre(optimizer, args, kwargs, sys._getframe(1))
        self._note(
            "second",
            f"gradscope: a second optimizer ({type(optimizer).__name__}) steps this model's "
            f"parameters; steps are closed by the first one ({type(self.optimizer).__name__})."
            " Pass optimizer= to choose, or watch each network (e.g. a GAN's generator and "
            "discriminator) separately",
        )
        return None

    def _any_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer is self.optimizer and optimizer is not self._given:
            self._post(optimizer, args, kwargs)

    def _note(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _pre(self, optimizer: Any, args: Any, kwargs: Any, caller: FrameType | None = None) -> Any:
        caller = caller or sys._getframe(1)  # torch's step wrapper
        if self._outer is not None and _on_stack(self._outer, caller):
            self._nested += 1  # a step inside the step (super().step()): not another update
            return None
        # (an outer frame no longer on the stack: that step raised before its post-hook)
        self._outer, self._nested = caller, 0
        # args are step()'s own: (optimizer, closure?)
        closure = kwargs.get("closure") if kwargs else None
        if closure is None and len(args) > 1 and callable(args[1]):
            closure = args[1]
        if closure is None:
            self._before()
            return None

        # step(closure) (Lightning, LBFGS): the closure makes the gradients inside step(), so
        # they are read when it returns, just before the update uses them
        def read_after(*a: Any, **kw: Any) -> Any:
            loss = closure(*a, **kw)
            self._before()
            return loss

        if kwargs and "closure" in kwargs:
            return args, {**kwargs, "closure": read_after}
        return (args[0], read_after, *args[2:]), kwargs

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._nested:
            self._nested -= 1
            return
        self._outer = None
        self._after()


def _on_stack(frame: FrameType, start: FrameType) -> bool:
    """Whether `frame` is `start` or one of its callers."""
    f: FrameType | None = start
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False
