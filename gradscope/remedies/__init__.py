"""Remedies: a change per cause that gradscope applies itself, and trials that rerun a stretch
of training with each from the same start and measure whether it helped.

Example:
    >>> from gradscope.remedies import REMEDIES
    >>> REMEDIES["clip_1.0"].code
    'torch.nn.utils.clip_grad_norm_(model.parameters(), 1)  # between loss.backward() and optimizer.step()'
"""

from gradscope.remedies.catalog import REMEDIES, remedy
from gradscope.remedies.core import CannotApply, Context, Remedy
from gradscope.remedies.proposals import PROPOSALS, needed, propose, remedies_for
from gradscope.remedies.runner import try_remedies
from gradscope.remedies.trial import Trial, TrialError, TrialRun

__all__ = [
    "PROPOSALS",
    "REMEDIES",
    "CannotApply",
    "Context",
    "Remedy",
    "Trial",
    "TrialError",
    "TrialRun",
    "needed",
    "propose",
    "remedies_for",
    "remedy",
    "try_remedies",
]
