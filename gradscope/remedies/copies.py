"""The start every rerun copies: the user's model and optimizer deep-copied together, without
the hooks of a recorder that watches the user's model.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.optim import Optimizer

from gradscope.recorder import hooks
from gradscope.remedies.trial import TrialError


def copy_start(make: Callable[[], Any]) -> tuple[nn.Module, Optimizer]:
    """The start every run copies: what `make()` returns (the caller seeds first), copied at
    once (model and optimizer together, so the optimizer's parameters are the copy's)."""
    made = make()
    if not isinstance(made, tuple | list) or len(made) != 2:
        raise TrialError("make() must return (model, optimizer)")
    model, optimizer = made
    if not isinstance(model, nn.Module):
        raise TrialError(f"make() returned a {type(model).__name__} as the model, not an nn.Module")
    if not isinstance(optimizer, Optimizer):
        raise TrialError(
            f"make() returned a {type(optimizer).__name__} as the optimizer, not a "
            "torch.optim.Optimizer"
        )
    # a recorder watching the user's model is not copied along with its hooks (its hooks'
    # closures are shared by a deep copy: the copies' training would land in its steps)
    memo: dict[int, Any] = {}
    for module in model.modules():
        for recorder in hooks._WATCHED.get(module, []):
            memo[id(recorder)] = _Unwatched()
    try:
        start = copy.deepcopy((model, optimizer), memo)
    except Exception as e:  # a module holding a lock, a file or an unpicklable hook
        raise TrialError(f"the model and optimizer cannot be deep-copied ({e})") from None
    _drop_gradscope_hooks(start[0])
    return start


class _Unwatched:
    """Stands in, in the copies, for a recorder that watches the user's model."""


_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_post_accumulate_grad_hooks",  # (on parameters)
)


def _drop_gradscope_hooks(model: nn.Module) -> None:
    """Removes the recorder's hooks from a copy: on its modules and on its parameters."""
    for holder in [*model.modules(), *model.parameters()]:
        for name in _HOOK_TABLES:
            table = getattr(holder, name, None)
            if not table:
                continue
            for key, fn in list(table.items()):
                if _recorders_hook(fn):
                    del table[key]


def _recorders_hook(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, _Unwatched):
        return True
    where = getattr(fn, "__module__", None) or type(owner).__module__
    return str(where).startswith("gradscope.recorder")
