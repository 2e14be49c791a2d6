"""The catalog: every remedy by name, each a change gradscope applies itself to a copy of a
model and its optimizer (changes.py, reinit.py), said in words and in the line a user writes.
"""

from __future__ import annotations

from gradscope.remedies.changes import (
    ADAMW_LR,
    CLIP_NORM,
    WARMUP_STEPS,
    adaptive_default_lr,
    add_missing,
    cap_lr,
    clip,
    remove_zero_lr,
    scale_lr,
    standardize_inputs,
    to_adamw,
    unfreeze,
    warmup,
    zero_grad,
)
from gradscope.remedies.core import Remedy
from gradscope.remedies.reinit import reinit

REMEDIES: dict[str, Remedy] = {
    r.name: r
    for r in (
        Remedy(
            "lr_x0.3",
            "scale every learning rate down to 0.3x",
            'for group in optimizer.param_groups: group["lr"] *= 0.3',
            scale_lr(0.3),
        ),
        Remedy(
            "lr_x0.1",
            "scale every learning rate down to 0.1x",
            'for group in optimizer.param_groups: group["lr"] *= 0.1',
            scale_lr(0.1),
        ),
        Remedy(
            "warmup",
            f"warm the learning rate up linearly from 0 over the first {WARMUP_STEPS} steps "
            "(a fifth of a shorter trial)",
            "scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, "
            f"(s + 1) / {WARMUP_STEPS}))  # scheduler.step() after each optimizer.step()",
            warmup,
        ),
        Remedy(
            "clip_1.0",
            f"clip the total gradient norm at {CLIP_NORM:g} before each update",
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), {CLIP_NORM:g})  "
            "# between loss.backward() and optimizer.step()",
            clip,
        ),
        Remedy(
            "reinit_matched",
            "re-initialize every Linear/Conv layer with an init matched to the activation "
            "after it (kaiming for ReLU-like, xavier with gain 5/3 for tanh, 4 for sigmoid), biases zero",
            'nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # xavier_normal_('
            'w, gain=nn.init.calculate_gain("tanh")) before a tanh',
            reinit(orthogonal=False),
        ),
        Remedy(
            "reinit_orthogonal",
            "re-initialize every Linear/Conv layer orthogonally, with the gain of the "
            "activation after it, biases zero",
            'nn.init.orthogonal_(layer.weight, gain=nn.init.calculate_gain("relu"))',
            reinit(orthogonal=True),
        ),
        Remedy(
            "zero_grad",
            "zero the gradients before each step's forward, so each update uses only that "
            "step's gradient",
            "optimizer.zero_grad(set_to_none=True)  # first line of each training step",
            zero_grad,
        ),
        Remedy(
            "add_missing_params",
            "add the trainable parameters that no optimizer group holds to the optimizer",
            'optimizer.add_param_group({"params": forgotten})  # or build it over '
            "model.parameters()",
            add_missing,
        ),
        Remedy(
            "unfreeze",
            "set requires_grad=True on frozen parameters and optimize them",
            "for p in model.parameters(): p.requires_grad_(True)",
            unfreeze,
        ),
        Remedy(
            "sgd_to_adamw",
            f"replace plain SGD by AdamW (lr {ADAMW_LR:g}), which rescales each parameter's "
            "step by its gradient's running size",
            f"optimizer = torch.optim.AdamW(model.parameters(), lr={ADAMW_LR:g})",
            to_adamw,
        ),
        Remedy(
            "adam_default_lr",
            f"set an adaptive optimizer's (Adam, AdamW) learning rates above {ADAMW_LR:g}, "
            "the published default, to it",
            f'for group in optimizer.param_groups: group["lr"] = min(group["lr"], {ADAMW_LR:g})',
            adaptive_default_lr,
        ),
        Remedy(
            "cap_lr",
            "keep every learning rate at most its value at the start (undoes a mid-run "
            "increase, e.g. a schedule edited by mistake)",
            'for group in optimizer.param_groups: group["lr"] = min(group["lr"], base_lr)',
            cap_lr,
        ),
        Remedy(
            "standardize_inputs",
            "standardize the model's input by the mean and standard deviation of the first "
            "batch (one number each)",
            "x = (x - x_mean) / x_std  # the training inputs' statistics, before model(x)",
            standardize_inputs,
        ),
        Remedy(
            "remove_zero_lr",
            "give the parameter groups whose learning rate is 0 (from the start, or set by a "
            "schedule) the optimizer's working learning rate",
            'for group in optimizer.param_groups: group["lr"] = group["lr"] or base_lr',
            remove_zero_lr,
        ),
    )
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
