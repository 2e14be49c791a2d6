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
