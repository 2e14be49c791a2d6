"""Which verdicts propose which remedies, and the gate: only warnings and errors propose."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from gradscope.remedies.catalog import REMEDIES
from gradscope.remedies.core import Remedy

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
