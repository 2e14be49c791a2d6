"""Which verdicts propose which remedies, and the gate: a remedy is proposed only on evidence
that it is needed (a warning or an error, and for a one-off spike, a run that did not recover).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gradscope.remedies.catalog import REMEDIES
from gradscope.remedies.core import Remedy

# Which remedies each verdict id proposes, the likeliest fix first. Ids that no rule emits
# (yet) are harmless: a verdict's id is looked up, never the other way round, so names the
# diagnosis may use are listed beside today's.
PROPOSALS: dict[str, tuple[str, ...]] = {
    "nonfinite_values": ("lr_x0.1", "clip_1.0", "warmup"),
    "nonfinite_forward": ("lr_x0.1", "clip_1.0", "warmup"),
    "divergence": ("lr_x0.1", "clip_1.0", "warmup"),
    "lr_too_high": (
        "lr_x0.1",
        "lr_x0.3",
        "adam_default_lr",
        "cap_lr",
        "sgd_to_adamw",
        "warmup",
        "clip_1.0",
    ),
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
    "update_too_large": ("lr_x0.3", "lr_x0.1", "adam_default_lr", "clip_1.0"),
    "dead_units": ("reinit_matched", "lr_x0.3"),
    "dead_units_rising": ("lr_x0.3", "lr_x0.1", "reinit_matched"),
    "saturated_units": ("reinit_matched", "standardize_inputs", "reinit_orthogonal"),
    "saturated_units_rising": ("reinit_matched", "lr_x0.3"),
    "loss_not_decreasing": ("remove_zero_lr", "sgd_to_adamw", "reinit_matched"),
}


# Verdicts about one event: a run whose loss came back below where it stood before the event
# got over it, and a remedy for it has nothing left to fix.
EVENTS = ("gradient_spike", "loss_spike")


def needed(verdict: Any, losses: Sequence[float] | None = None) -> bool:
    """Whether a verdict is evidence that a remedy is needed: a warning or an error; for a
    one-off event (EVENTS) with the run's per-step losses known, only where the run did not
    recover: its final loss (the mean of the last tenth) is not finite or not below the
    mean of the tenth of the steps before the event."""
    if getattr(verdict, "severity", "") not in ("warning", "error"):
        return False
    at = getattr(verdict, "first_step", None)
    if str(verdict.id) not in EVENTS or not losses or at is None or at < 1:
        return True
    values = np.asarray(losses, dtype=float)
    tenth = max(1, len(values) // 10)
    before = float(np.mean(values[max(0, at - tenth) : at]))
    final = float(np.mean(values[-tenth:]))
    return not (math.isfinite(final) and math.isfinite(before) and final < before)


def propose(
    verdicts: Iterable[Any], limit: int | None = None, losses: Sequence[float] | None = None
) -> list[Remedy]:
    """The remedies a list of verdicts proposes, worst verdict first, each verdict's likeliest
    fix first, without repeats. Only verdicts that show a remedy is needed propose (`needed`:
    warnings and errors; a spike only where the run, given its `losses`, did not get over
    it): a healthy run gets none.
    """
    ranked = sorted(
        (v for v in verdicts if needed(v, losses)),
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
