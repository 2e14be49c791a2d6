"""The diagnosis's public entry points (kept here for `gs.diagnose` and older imports): the
rules themselves live in gradscope.analysis."""

from __future__ import annotations

from gradscope.analysis import OnlineDiagnosis, diagnose
from gradscope.analysis.rules.flow import VANISHING_RATIO
from gradscope.verdict import SEVERITIES, Verdict

# The report draws these as reference lines: healthy update/weight ratios sit near 1e-3 a
# step (Karpathy's rule of thumb); the exploding line is the mirror of the vanishing one.
UPDATE_RATIO_LOW = 1e-5
UPDATE_RATIO_HIGH = 1e-1
EXPLODING_RATIO = 1.0 / VANISHING_RATIO

__all__ = [
    "EXPLODING_RATIO",
    "SEVERITIES",
    "UPDATE_RATIO_HIGH",
    "UPDATE_RATIO_LOW",
    "VANISHING_RATIO",
    "OnlineDiagnosis",
    "Verdict",
    "diagnose",
]
