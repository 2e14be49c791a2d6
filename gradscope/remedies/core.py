"""What a remedy is: a named change to a model and its optimizer, said in words and in code,
and the context it is applied in (the trial's length and seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torch.optim import Optimizer


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
