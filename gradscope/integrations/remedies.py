"""Remedies in the trainers: a Lightning callback that applies one to the optimizer Lightning
builds, and a transformers `TrainingArguments` changed to carry one; what does not fit says so.

Example:
    >>> from gradscope.integrations.remedies import lightning_callback
    >>> cb = lightning_callback("lr_x0.3")  # L.Trainer(callbacks=[cb]).fit(module, loader)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gradscope.remedies.catalog import remedy
from gradscope.remedies.changes import ADAMW_LR, CLIP_NORM, WARMUP_STEPS
from gradscope.remedies.core import CannotApply, Context, Remedy

# Lightning steps its optimizers with a closure (forward and backward run inside
# optimizer.step), so a change made before the update cannot see that step's gradients;
# and it zeroes gradients itself.
_LIGHTNING_NOT = {
    "clip_1.0": f"Lightning computes gradients inside optimizer.step(closure), so clip with "
    f"L.Trainer(gradient_clip_val={CLIP_NORM:g}) instead",
    "zero_grad": "Lightning zeroes gradients itself under automatic optimization; with "
    "manual optimization call optimizer.zero_grad() in training_step",
}
# The transformers Trainer builds the model's optimizer itself from its arguments and zeroes
# gradients itself; these change the model or the loop, not the arguments.
_TRANSFORMERS_NOT = {
    "zero_grad": "the Trainer zeroes gradients itself",
    "add_missing_params": "the Trainer optimizes every parameter with requires_grad=True",
    "reinit_matched": "re-initialize the model before Trainer(model=...): "
    "REMEDIES['reinit_matched'].apply(model, torch.optim.SGD(model.parameters(), lr=0))",
    "reinit_orthogonal": "re-initialize the model before Trainer(model=...): "
    "REMEDIES['reinit_orthogonal'].apply(model, torch.optim.SGD(model.parameters(), lr=0))",
    "unfreeze": "set requires_grad=True on the parameters before Trainer(model=...)",
}


def lightning_callback(which: str | Remedy, steps: int = 200, seed: int = 0) -> Any:
    """A Lightning Callback that applies a remedy when training starts, to the LightningModule
    and the optimizer `configure_optimizers` built (a replaced optimizer is handed back to the
    trainer; a scheduler's base learning rates follow a scaled learning rate).

    Raises:
        CannotApply: for a remedy Lightning cannot take this way (clipping, zeroing
            gradients); the message says what to do instead.
    """
    import lightning.pytorch as pl

    chosen = remedy(which)
    if chosen.name in _LIGHTNING_NOT:
        raise CannotApply(_LIGHTNING_NOT[chosen.name])

    class RemedyCallback(pl.Callback):
        def __init__(self) -> None:
            self.remedy = chosen

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if len(trainer.optimizers) != 1:
                raise CannotApply(
                    f"{chosen.name} applies to one optimizer; this module has "
                    f"{len(trainer.optimizers)}"
                )
            old = trainer.optimizers[0]
            before = [float(g["lr"]) for g in old.param_groups]
            new = chosen.apply(pl_module, old, Context(steps, seed))
            for config in trainer.lr_scheduler_configs:
                scheduler = config.scheduler
                if new is not old:
                    raise CannotApply(
                        f"{chosen.name} replaces the optimizer, which the learning-rate "
                        "scheduler from configure_optimizers still steps: change "
                        "configure_optimizers instead"
                    )
                base = getattr(scheduler, "base_lrs", None)
                if base is not None:
                    after = [float(g["lr"]) for g in new.param_groups]
                    scheduler.base_lrs = [  # type: ignore[attr-defined]
                        b * (a / o) if o else b
                        for b, a, o in zip(base, after, before, strict=False)
                    ]
            if new is not old:
                trainer.strategy.optimizers = [new]

    return RemedyCallback()


def training_arguments(args: Any, which: str | Remedy) -> Any:
    """A copy of a transformers `TrainingArguments` with the remedy in it: learning rate
    scaled, `warmup_steps`, `max_grad_norm`, `optim="adamw_torch"`, or a learning rate of zero
    replaced by the Trainer's default (5e-5).

    Raises:
        CannotApply: the remedy is not a Trainer argument (the message says where it goes),
            or it changes nothing (AdamW already, no zero learning rate).
    """
    chosen = remedy(which)
    if chosen.name in _TRANSFORMERS_NOT:
        raise CannotApply(_TRANSFORMERS_NOT[chosen.name])
    changes: dict[str, Any]
    if chosen.name in ("lr_x0.3", "lr_x0.1"):
        if args.learning_rate == 0:
            raise CannotApply("the learning rate is zero: scaling it changes nothing")
        changes = {"learning_rate": args.learning_rate * float(chosen.name.removeprefix("lr_x"))}
    elif chosen.name == "warmup":
        changes = {"warmup_steps": WARMUP_STEPS}
    elif chosen.name == "clip_1.0":
        changes = {"max_grad_norm": CLIP_NORM}
    elif chosen.name == "sgd_to_adamw":
        if "adamw" in str(args.optim).lower():
            raise CannotApply(f"the Trainer's optimizer is already {args.optim}")
        changes = {"optim": "adamw_torch"}
    elif chosen.name == "adam_default_lr":
        if args.learning_rate <= ADAMW_LR:
            raise CannotApply(f"the learning rate is already at most {ADAMW_LR:g}")
        changes = {"learning_rate": ADAMW_LR}
    elif chosen.name == "remove_zero_lr":
        if args.learning_rate != 0:
            raise CannotApply("no learning rate is zero")
        changes = {"learning_rate": 5e-5}
    else:
        raise CannotApply(f"{chosen.name} has no transformers TrainingArguments form")
    # TrainingArguments derives fields in __post_init__: rebuild from the init fields
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    fields.update(changes)
    return type(args)(**fields)
