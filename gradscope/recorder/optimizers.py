"""The optimizer's side of a step: read the gradients just before the update, close the step
after it. The optimizer is the one given, or the first found stepping the model's parameters
through torch's global optimizer step hooks (wherever a trainer creates it)."""

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
    the update is done, for one optimizer: `optimizer`, or else the first one found that
    steps any of `params`. A second optimizer over the same parameters is warned about once;
    optimizers over other parameters are ignored."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        params: Iterable[torch.Tensor],
        before: Callable[[], None],
        after: Callable[[], None],
    ) -> None:
        self.optimizer = optimizer
        self.searching = optimizer is None  # looking for (or following) one found
        self._before, self._after = before, after
        self._param_ids = {id(p) for p in params}
        self._checked: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        # the frame of torch's step wrapper running the update now, and how many steps run
        # inside it: a subclass whose step() calls super().step() runs the hooks again, inside
        # the first; the outermost step is the update
        self._outer: FrameType | None = None
        self._nested = 0
        if optimizer is not None:
            self.handles: list[RemovableHandle] = [
                optimizer.register_step_pre_hook(self._pre),
                optimizer.register_step_post_hook(self._post),
            ]
        else:
            self.handles = [
                register_optimizer_step_pre_hook(self._any_pre),
                register_optimizer_step_post_hook(self._any_post),
            ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _any_pre(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        if optimizer is self.optimizer:
            return self._pre(optimizer, args, kwargs, sys._getframe(1))
        if not self._steps_our_params(optimizer):
            return None
        if self.optimizer is None:  # the first optimizer over the model's parameters
            self.optimizer = optimizer
            return self._pre(optimizer, args, kwargs, sys._getframe(1))
        warnings.warn(
            f"gradscope: a second optimizer ({type(optimizer).__name__}) steps this model's "
            f"parameters; steps are closed by the first one ({type(self.optimizer).__name__})."
            " Pass optimizer= to choose, or watch each network (e.g. a GAN's generator and "
            "discriminator) separately",
            stacklevel=2,
        )
        return None

    def _any_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer is self.optimizer:
            self._post(optimizer, args, kwargs)

    def _steps_our_params(self, optimizer: Any) -> bool:
        """Whether an optimizer not seen before updates any of the parameters (each one is
        answered once: after that, False)."""
        if optimizer in self._checked:
            return False
        self._checked[optimizer] = True
        ids = self._param_ids
        return any(id(p) in ids for g in optimizer.param_groups for p in g["params"])

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
