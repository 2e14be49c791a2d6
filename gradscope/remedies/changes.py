"""The remedies that change the learning rate, the optimizer, the gradients or the inputs:
each a function (model, optimizer, context) -> the optimizer to train with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from gradscope.remedies.core import CannotApply, Context

# A warm-up over this many steps (or a fifth of a shorter trial): long enough for Adam's
# second-moment estimates to settle (Liu et al. 2020 show Post-LN diverging without it).
WARMUP_STEPS = 40
CLIP_NORM = 1.0
ADAMW_LR = 1e-3


def _lrs(optimizer: Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def scale_lr(factor: float) -> Callable[[nn.Module, Optimizer, Context], Optimizer]:
    def change(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
        if all(lr == 0 for lr in _lrs(optimizer)):
            raise CannotApply("the learning rate is zero: scaling it changes nothing")
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
            if "initial_lr" in group:  # a scheduler's base, which it would restore
                group["initial_lr"] = group["initial_lr"] * factor
        return optimizer

    return change


def warmup(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    if all(lr == 0 for lr in _lrs(optimizer)):
        raise CannotApply("the learning rate is zero: there is nothing to warm up to")
    length = max(1, min(WARMUP_STEPS, context.steps // 5))
    taken = [0]
    held: list[Any] = []

    # the update of step k uses (k + 1) / length of the learning rate the loop set, which is
    # put back after the update: a schedule of the loop's own keeps working under it
    def before(opt: Optimizer, args: Any, kwargs: Any) -> None:
        held.clear()
        if taken[0] < length:
            scale = (taken[0] + 1) / length
            for group in opt.param_groups:
                held.append(group["lr"])
                group["lr"] = group["lr"] * scale
        taken[0] += 1

    def after(opt: Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in zip(opt.param_groups, held, strict=False):
            group["lr"] = lr
        held.clear()

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


def _params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def clip(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    params = _params(optimizer)
    if not params:
        raise CannotApply("the optimizer holds no parameters")

    # before the update, after backward: what torch.nn.utils.clip_grad_norm_ in a loop does
    # (an optimizer stepped with a closure computes its gradients later: not covered)
    def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], CLIP_NORM)

    optimizer.register_step_pre_hook(hook)
    return optimizer


def zero_grad(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    if not any(p.requires_grad for p in model.parameters()):
        raise CannotApply("the model has no trainable parameters")
    stepped = [False]

    # zeroed at the first forward after an update (where `optimizer.zero_grad()` opens a
    # loop), not in the step's post-hook: the recorder still reads the gradients there, and
    # micro-batches accumulated before one update are kept
    def after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
        stepped[0] = True

    def before_forward(module: nn.Module, args: Any) -> None:
        if stepped[0]:
            stepped[0] = False
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)

    optimizer.register_step_post_hook(after_step)
    model.register_forward_pre_hook(before_forward)
    return optimizer


def add_missing(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    held = {id(p) for p in _params(optimizer)}
    missing = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    if not missing:
        raise CannotApply("every trainable parameter is already in the optimizer")
    optimizer.add_param_group({"params": missing, "lr": _working_lr(optimizer)})
    return optimizer


def unfreeze(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    if not frozen:
        raise CannotApply("no parameter has requires_grad=False")
    for p in frozen:
        p.requires_grad_(True)
    held = {id(p) for p in _params(optimizer)}
    missing = [p for p in frozen if id(p) not in held]
    if missing:
        optimizer.add_param_group({"params": missing, "lr": _working_lr(optimizer)})
    return optimizer


def _working_lr(optimizer: Optimizer) -> float:
    """A learning rate that is not zero: the largest of the groups', else the optimizer's
    default, else a usual one for its kind (1e-3 adaptive, 1e-2 otherwise)."""
    lrs = [lr for lr in _lrs(optimizer) + [float(optimizer.defaults.get("lr", 0.0))] if lr > 0]
    if lrs:
        return max(lrs)
    return 1e-3 if "betas" in optimizer.defaults else 1e-2


def remove_zero_lr(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    if not _params(optimizer):
        raise CannotApply("the optimizer holds no parameters")
    lr = _working_lr(optimizer)
    for group in optimizer.param_groups:
        if float(group["lr"]) == 0:
            group["lr"] = lr
    # a schedule may set a learning rate to 0 later: replaced for each update
    return _lr_for_each_update(optimizer, lambda i, now: lr if now == 0 else now)


def cap_lr(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    base = [float(g["lr"]) for g in optimizer.param_groups]
    if all(lr == 0 for lr in base):
        raise CannotApply("the learning rate is zero: there is nothing to cap it at")
    # each update uses at most the learning rate of the start (the schedule may come back
    # down under the cap)
    return _lr_for_each_update(
        optimizer, lambda i, now: min(now, base[i]) if i < len(base) else now
    )


def _lr_for_each_update(optimizer: Optimizer, choose: Callable[[int, float], float]) -> Optimizer:
    """Each update made with `choose(group index, the loop's learning rate)` where that
    differs; the loop's own value is put back after it, so its schedule's state goes on."""
    held: list[Any] = []

    def before(opt: Optimizer, args: Any, kwargs: Any) -> None:
        held[:] = [g["lr"] for g in opt.param_groups]
        for i, group in enumerate(opt.param_groups):
            now = float(group["lr"])
            if (new := choose(i, now)) != now:
                group["lr"] = new

    def after(opt: Optimizer, args: Any, kwargs: Any) -> None:
        for group, old in zip(opt.param_groups, held, strict=False):
            group["lr"] = old

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


def standardize_inputs(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    stats: list[float] = []

    # one mean and one standard deviation, from the first batch the model sees: per-feature
    # statistics would divide by zero on constant features (an image's border pixels)
    def before_forward(module: nn.Module, args: Any) -> Any:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            raise CannotApply("the model's input is not a floating-point tensor (token ids?)")
        x = args[0]
        if not stats:
            std = float(x.detach().double().std())
            stats[:] = [float(x.detach().double().mean()), std if std > 0 else 1.0]
        return ((x - stats[0]) / stats[1], *args[1:])

    model.register_forward_pre_hook(before_forward)
    return optimizer


def to_adamw(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    if type(optimizer) is not torch.optim.SGD:
        raise CannotApply(f"the optimizer is {type(optimizer).__name__}, not plain SGD")
    groups = [
        {"params": g["params"], "lr": ADAMW_LR if float(g["lr"]) > 0 else 0.0}
        for g in optimizer.param_groups
    ]
    return torch.optim.AdamW(groups, lr=ADAMW_LR)


def adaptive_default_lr(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    # an adaptive optimizer moves each weight by about its learning rate a step, whatever the
    # gradient's size: above the published default (Kingma and Ba 2015: 1e-3) that step is
    # large next to the weights of a usual init, and scaling it down by 3 or 10 may not suffice
    if "betas" not in optimizer.defaults:
        raise CannotApply(
            f"the optimizer is {type(optimizer).__name__}, not an adaptive one (Adam, AdamW)"
        )
    if all(float(g["lr"]) <= ADAMW_LR for g in optimizer.param_groups):
        raise CannotApply(f"every learning rate is already at most {ADAMW_LR:g}")
    for group in optimizer.param_groups:
        if float(group["lr"]) > ADAMW_LR:
            group["lr"] = ADAMW_LR
            if "initial_lr" in group:  # a scheduler's base, which it would restore
                group["initial_lr"] = ADAMW_LR
    return optimizer
