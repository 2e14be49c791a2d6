"""The recorder's errors and events."""

from __future__ import annotations

from dataclasses import dataclass


class RecorderError(RuntimeError):
    """Misuse of a Recorder: a second recorder on a model, a missing optimizer, ..."""


@dataclass(frozen=True)
class NonfiniteEvent:
    """Where a non-finite value first appeared in a step."""

    step: int
    phase: str  # "forward" (module output) or "backward" (gradient w.r.t. the output)
    layer: str


def why_nothing_recorded(steps: int, has_params: bool, any_scheduled: bool, every: object) -> str:
    """Why a recorder detached with nothing recorded, in words: `steps` closed since attach,
    whether it had parameters, whether `every` scheduled any of those steps."""
    if steps == 0:
        if not has_params:
            return (
                "no step was closed, and the model has no trainable parameters for an "
                "optimizer to step: call rec.step() after each forward"
            )
        return (
            "no step was closed: no optimizer stepped this model's parameters and "
            "rec.step() was never called (pass optimizer=, build the optimizer over "
            "model.parameters(), or call rec.step() after each backward)"
        )
    if not any_scheduled:
        return f"{steps} step(s) were closed but every={every!r} recorded none of them"
    return (
        f"{steps} step(s) were closed, but no forward pass with gradients enabled ran "
        "through the model's modules and no parameter had a gradient"
    )
