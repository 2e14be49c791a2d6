"""Remedies: a change per cause that gradscope applies itself, and trials that rerun a stretch
of training with each from the same start and measure whether it helped.

Example:
    >>> from gradscope.remedies import REMEDIES
    >>> REMEDIES["clip_1.0"].code
    'torch.nn.utils.clip_grad_norm_(model.parameters(), 1)  # between loss.backward() and optimizer.step()'
"""

from gradscope.remedies.catalog import (
    PROPOSALS,
    REMEDIES,
    CannotApply,
    Context,
    Remedy,
    propose,
    remedies_for,
    remedy,
)
from gradscope.remedies.trial import Trial, TrialError, TrialRun, try_remedies

__all__ = [
    "PROPOSALS",
    "REMEDIES",
    "CannotApply",
    "Context",
    "Remedy",
    "Trial",
    "TrialError",
    "TrialRun",
    "propose",
    "remedies_for",
    "remedy",
    "try_remedies",
]
