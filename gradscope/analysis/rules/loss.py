"""A loss that does not decrease: a symptom, reported alone as info."""

from __future__ import annotations

import numpy as np

from gradscope.analysis.view import RunView
from gradscope.schema import Severity, VerdictId
from gradscope.verdict import Verdict, fmt

# The loss's median over the last quarter of the run at or above this share of its median
# over the first quarter.
LOSS_FLAT = 0.98
MIN_POINTS = 20


def check(view: RunView) -> list[Verdict]:
    loss = view.loss
    loss = loss[np.isfinite(loss.to_numpy(dtype=float))]
    if len(loss) < MIN_POINTS:
        return []
    quarter = len(loss) // 4
    head, tail = float(loss.iloc[:quarter].median()), float(loss.iloc[-quarter:].median())
    if not (head > 0 and tail >= LOSS_FLAT * head):
        return []
    return [
        Verdict(
            VerdictId.LOSS_NOT_DECREASING,
            Severity.INFO,
            f"the loss did not decrease: median {fmt(tail)} over the last quarter of the run "
            f"against {fmt(head)} over the first",
            "check the learning rate, the labels and the other verdicts",
            [],
            {"first_quarter_median": head, "last_quarter_median": tail},
            LOSS_FLAT,
            int(loss.index[0]),
            int(loss.index[-1]),
        )
    ]
