"""The remedies: each a change gradscope applies itself to a copy of a model and its optimizer,
said in words and in the line a user would write; and which verdicts propose which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

# A warm-up over this many steps (or a fifth of a shorter trial): long enough for Adam's
# second-moment estimates to settle (Liu et al. 2020 show Post-LN diverging without it).
WARMUP_STEPS = 40
CLIP_NORM = 1.0
ADAMW_LR = 1e-3


class CannotApply(Exception):
    """A remedy that does not fit this model or optimizer; the message says why."""


@dataclass(frozen=True)
class Context:
    """What a remedy may need beyond the model and optimizer: the trial's length and seed."""

    steps: int = 200
    seed: int = 0


@dataclass(frozen=True)
class Remedy:
    """A change to a run, said in words (`description`) and in code (`code`).

    `apply(model, optimizer)` changes them in place (hooks, learning rates, weights) and
    returns the optimizer to train with (a new one where the remedy replaces it); it raises
    CannotApply, with the reason, where the remedy does not fit.
    """

    name: str
    description: str
    code: str
    change: Callable[[nn.Module, Optimizer, Context], Optimizer] = field(repr=False, compare=False)

    def apply(
        self, model: nn.Module, optimizer: Optimizer, context: Context | None = None
    ) -> Optimizer:
        return self.change(model, optimizer, context or Context())

    def __str__(self) -> str:
        return f"{self.name}: {self.description} ({self.code})"


# -- the changes ---------------------------------------------------------------------------


def _lrs(optimizer: Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def _scale_lr(factor: float) -> Callable[[nn.Module, Optimizer, Context], Optimizer]:
    def change(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
        if all(lr == 0 for lr in _lrs(optimizer)):
            raise CannotApply("the learning rate is zero: scaling it changes nothing")
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
            if "initial_lr" in group:  # a scheduler's base, which it would restore
                group["initial_lr"] = group["initial_lr"] * factor
        return optimizer

    return change


def _warmup(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
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


def _clip(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    params = _params(optimizer)
    if not params:
        raise CannotApply("the optimizer holds no parameters")

    # before the update, after backward: what torch.nn.utils.clip_grad_norm_ in a loop does
    # (an optimizer stepped with a closure computes its gradients later: not covered)
    def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], CLIP_NORM)

    optimizer.register_step_pre_hook(hook)
    return optimizer


def _zero_grad(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
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


def _add_missing(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    held = {id(p) for p in _params(optimizer)}
    missing = [p for p in model.parameters() if p.requires_grad and id(p) not in held]
    if not missing:
        raise CannotApply("every trainable parameter is already in the optimizer")
    optimizer.add_param_group({"params": missing, "lr": _working_lr(optimizer)})
    return optimizer


def _unfreeze(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
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


def _remove_zero_lr(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    if not _params(optimizer):
        raise CannotApply("the optimizer holds no parameters")
    lr = _working_lr(optimizer)
    for group in optimizer.param_groups:
        if float(group["lr"]) == 0:
            group["lr"] = lr
    held: list[Any] = []

    # a schedule may set a learning rate to 0 later: replaced for each update, and put back
    # after it so the schedule's own state goes on
    def before(opt: Optimizer, args: Any, kwargs: Any) -> None:
        held[:] = [g["lr"] for g in opt.param_groups]
        for group in opt.param_groups:
            if float(group["lr"]) == 0:
                group["lr"] = lr

    def after(opt: Optimizer, args: Any, kwargs: Any) -> None:
        for group, old in zip(opt.param_groups, held, strict=False):
            group["lr"] = old

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


def _cap_lr(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    base = [float(g["lr"]) for g in optimizer.param_groups]
    if all(lr == 0 for lr in base):
        raise CannotApply("the learning rate is zero: there is nothing to cap it at")
    held: list[Any] = []

    # each update uses at most the learning rate of the start; the loop's own value is put
    # back after it, so its schedule goes on (and may come back down under the cap)
    def before(opt: Optimizer, args: Any, kwargs: Any) -> None:
        held[:] = [g["lr"] for g in opt.param_groups]
        for group, cap in zip(opt.param_groups, base, strict=False):
            if float(group["lr"]) > cap:
                group["lr"] = cap

    def after(opt: Optimizer, args: Any, kwargs: Any) -> None:
        for group, old in zip(opt.param_groups, held, strict=False):
            group["lr"] = old

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


def _standardize_inputs(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
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


def _to_adamw(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
    if type(optimizer) is not torch.optim.SGD:
        raise CannotApply(f"the optimizer is {type(optimizer).__name__}, not plain SGD")
    groups = [
        {"params": g["params"], "lr": ADAMW_LR if float(g["lr"]) > 0 else 0.0}
        for g in optimizer.param_groups
    ]
    return torch.optim.AdamW(groups, lr=ADAMW_LR)


# the modules whose weights an init shapes, and the activations that set its gain
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.Mish, nn.SELU)
_GAINS: dict[type[nn.Module], str] = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


@dataclass
class _Layer:
    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    act: nn.Module | None = None


def _layers_and_activations(model: nn.Module) -> list[_Layer]:
    """Each Linear/Conv layer with the activation module registered after it (before the next
    layer): registration order is forward order in sequential stacks."""
    found: list[_Layer] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, _LAYERS) and isinstance(weight, torch.Tensor):
            bias = getattr(module, "bias", None)
            found.append(_Layer(name, weight, bias if isinstance(bias, torch.Tensor) else None))
        elif found and found[-1].act is None and _is_activation(module):
            found[-1].act = module
    return found


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _RELU_LIKE + (nn.LeakyReLU, nn.Tanh, nn.Sigmoid))


def _reinit(orthogonal: bool) -> Callable[[nn.Module, Optimizer, Context], Optimizer]:
    def change(model: nn.Module, optimizer: Optimizer, context: Context) -> Optimizer:
        layers = _layers_and_activations(model)
        if not layers:
            raise CannotApply("the model has no Linear or Conv layer to re-initialize")
        if any(not layer.weight.is_floating_point() for layer in layers):
            raise CannotApply("a layer's weight is not floating point (quantized?)")
        g = torch.Generator(device=layers[0].weight.device).manual_seed(context.seed)
        with torch.no_grad():
            for layer in layers:
                weight, gain = layer.weight, _gain(layer.act)
                fresh = torch.empty_like(weight)
                fan_in = weight[0].numel()
                if orthogonal:
                    nn.init.orthogonal_(fresh, gain=gain, generator=g)
                elif isinstance(layer.act, _RELU_LIKE + (nn.LeakyReLU,)):
                    fresh.normal_(0.0, gain / math.sqrt(fan_in), generator=g)
                else:  # xavier: keeps both passes' variance for bounded or no activation
                    fan_out = weight.shape[0] * weight[0, 0].numel()
                    fresh.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator=g)
                weight.copy_(fresh)
                if layer.bias is not None:
                    layer.bias.zero_()
                # momentum or moment estimates of the old weights no longer fit
                for p in (weight, layer.bias):
                    if p is not None:
                        optimizer.state.pop(p, None)
        return optimizer

    return change


def _gain(act: nn.Module | None) -> float:
    if isinstance(act, nn.LeakyReLU):
        return nn.init.calculate_gain("leaky_relu", act.negative_slope)
    if isinstance(act, _RELU_LIKE):
        return nn.init.calculate_gain("relu")
    for kind, name in _GAINS.items():
        if isinstance(act, kind):
            return nn.init.calculate_gain(name)  # type: ignore[arg-type]
    return 1.0


# -- the catalog ---------------------------------------------------------------------------

REMEDIES: dict[str, Remedy] = {
    r.name: r
    for r in (
        Remedy(
            "lr_x0.3",
            "scale every learning rate down to 0.3x",
            'for group in optimizer.param_groups: group["lr"] *= 0.3',
            _scale_lr(0.3),
        ),
        Remedy(
            "lr_x0.1",
            "scale every learning rate down to 0.1x",
            'for group in optimizer.param_groups: group["lr"] *= 0.1',
            _scale_lr(0.1),
        ),
        Remedy(
            "warmup",
            f"warm the learning rate up linearly from 0 over the first {WARMUP_STEPS} steps "
            "(a fifth of a shorter trial)",
            "scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, "
            f"(s + 1) / {WARMUP_STEPS}))  # scheduler.step() after each optimizer.step()",
            _warmup,
        ),
        Remedy(
            "clip_1.0",
            f"clip the total gradient norm at {CLIP_NORM:g} before each update",
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), {CLIP_NORM:g})  "
            "# between loss.backward() and optimizer.step()",
            _clip,
        ),
        Remedy(
            "reinit_matched",
            "re-initialize every Linear/Conv layer with an init matched to the activation "
            "after it (kaiming for ReLU-like, xavier with tanh/sigmoid gain), biases zero",
            'nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # xavier_normal_('
            'w, gain=nn.init.calculate_gain("tanh")) before a tanh',
            _reinit(orthogonal=False),
        ),
        Remedy(
            "reinit_orthogonal",
            "re-initialize every Linear/Conv layer orthogonally, with the gain of the "
            "activation after it, biases zero",
            'nn.init.orthogonal_(layer.weight, gain=nn.init.calculate_gain("relu"))',
            _reinit(orthogonal=True),
        ),
        Remedy(
            "zero_grad",
            "zero the gradients before each step's forward, so each update uses only that "
            "step's gradient",
            "optimizer.zero_grad(set_to_none=True)  # first line of each training step",
            _zero_grad,
        ),
        Remedy(
            "add_missing_params",
            "add the trainable parameters that no optimizer group holds to the optimizer",
            'optimizer.add_param_group({"params": forgotten})  # or build it over '
            "model.parameters()",
            _add_missing,
        ),
        Remedy(
            "unfreeze",
            "set requires_grad=True on frozen parameters and optimize them",
            "for p in model.parameters(): p.requires_grad_(True)",
            _unfreeze,
        ),
        Remedy(
            "sgd_to_adamw",
            f"replace plain SGD by AdamW (lr {ADAMW_LR:g}), which rescales each parameter's "
            "step by its gradient's running size",
            f"optimizer = torch.optim.AdamW(model.parameters(), lr={ADAMW_LR:g})",
            _to_adamw,
        ),
        Remedy(
            "cap_lr",
            "keep every learning rate at most its value at the start (undoes a mid-run "
            "increase, e.g. a schedule edited by mistake)",
            'for group in optimizer.param_groups: group["lr"] = min(group["lr"], base_lr)',
            _cap_lr,
        ),
        Remedy(
            "standardize_inputs",
            "standardize the model's input by the mean and standard deviation of the first "
            "batch (one number each)",
            "x = (x - x_mean) / x_std  # the training inputs' statistics, before model(x)",
            _standardize_inputs,
        ),
        Remedy(
            "remove_zero_lr",
            "give the parameter groups whose learning rate is 0 (from the start, or set by a "
            "schedule) the optimizer's working learning rate",
            'for group in optimizer.param_groups: group["lr"] = group["lr"] or base_lr',
            _remove_zero_lr,
        ),
    )
}

# Which remedies each verdict id proposes, the likeliest fix first. Ids that no rule emits
# (yet) are harmless: a verdict's id is looked up, never the other way round, so names the
# diagnosis may use are listed beside today's.
PROPOSALS: dict[str, tuple[str, ...]] = {
    "nonfinite_values": ("lr_x0.1", "clip_1.0", "warmup"),
    "nonfinite_forward": ("lr_x0.1", "clip_1.0", "warmup"),
    "divergence": ("lr_x0.1", "clip_1.0", "warmup"),
    "lr_too_high": ("lr_x0.1", "lr_x0.3", "cap_lr", "sgd_to_adamw", "warmup", "clip_1.0"),
    "unnormalized_inputs": ("standardize_inputs",),
    "exploding_gradients": ("reinit_matched", "clip_1.0", "lr_x0.3", "reinit_orthogonal"),
    "vanishing_gradients": ("reinit_matched", "reinit_orthogonal", "sgd_to_adamw"),
    "gradient_spike": ("clip_1.0", "lr_x0.3", "lr_x0.1", "warmup"),
    "loss_spike": ("clip_1.0", "lr_x0.3", "lr_x0.1", "warmup"),
    "early_divergence": ("warmup", "lr_x0.3", "clip_1.0"),
    "postln_without_warmup": ("warmup", "lr_x0.3"),
    "gradient_growth": ("zero_grad", "lr_x0.3", "clip_1.0"),
    "gradients_not_zeroed": ("zero_grad",),
    "grads_not_zeroed": ("zero_grad",),
    "missing_zero_grad": ("zero_grad",),
    "gradient_accumulation": ("zero_grad",),
    "params_not_in_optimizer": ("add_missing_params",),
    "parameters_not_in_optimizer": ("add_missing_params",),
    "not_in_optimizer": ("add_missing_params",),
    "unoptimized_parameters": ("add_missing_params",),
    "frozen_parameters": ("unfreeze",),
    "frozen_by_mistake": ("unfreeze",),
    "no_updates": ("remove_zero_lr",),
    "no_gradient": ("unfreeze",),
    "lr_zero": ("remove_zero_lr",),
    "zero_learning_rate": ("remove_zero_lr",),
    "learning_rate_zero": ("remove_zero_lr",),
    "frozen_layers": ("remove_zero_lr", "add_missing_params", "reinit_matched", "sgd_to_adamw"),
    "update_too_small": ("remove_zero_lr", "sgd_to_adamw", "reinit_matched"),
    "update_too_large": ("lr_x0.3", "lr_x0.1", "clip_1.0"),
    "dead_units": ("reinit_matched", "lr_x0.3"),
    "dead_units_rising": ("lr_x0.3", "lr_x0.1", "reinit_matched"),
    "saturated_units": ("reinit_matched", "standardize_inputs", "reinit_orthogonal"),
    "saturated_units_rising": ("reinit_matched", "lr_x0.3"),
    "loss_not_decreasing": ("remove_zero_lr", "sgd_to_adamw", "reinit_matched"),
}


def remedy(name: str | Remedy) -> Remedy:
    """A remedy by name (or itself).

    Raises:
        KeyError: no such remedy; the message lists them.
    """
    if isinstance(name, Remedy):
        return name
    try:
        return REMEDIES[name]
    except KeyError:
        raise KeyError(f"no remedy {name!r}; choose from {', '.join(REMEDIES)}") from None


def propose(verdicts: Iterable[Any], limit: int | None = None) -> list[Remedy]:
    """The remedies a list of verdicts proposes, worst verdict first, each verdict's likeliest
    fix first, without repeats. Only warnings and errors propose: a healthy run gets none.
    """
    ranked = sorted(
        (v for v in verdicts if getattr(v, "severity", "") in ("warning", "error")),
        key=lambda v: 0 if v.severity == "error" else 1,  # stable: the diagnosis's own order
    )
    names: list[str] = []
    for v in ranked:
        for name in PROPOSALS.get(str(v.id), ()):
            if name not in names:
                names.append(name)
    chosen = [REMEDIES[n] for n in names]
    return chosen[:limit] if limit is not None else chosen


def remedies_for(verdict_id: str) -> Sequence[Remedy]:
    """The remedies one verdict id proposes (none for an id no remedy is attached to)."""
    return [REMEDIES[n] for n in PROPOSALS.get(verdict_id, ())]
