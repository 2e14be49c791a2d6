"""One module per rule: each has its thresholds as named constants, a `check(view)` that
returns its verdicts (with the numbers behind them as evidence), and its own tests.

`RULES` is the order they run in; gradscope.analysis.rank decides which verdicts are root
causes and which are their symptoms.
"""

from __future__ import annotations

from collections.abc import Callable

from gradscope.analysis.rules import (
    accumulation,
    flow,
    frozen,
    inputs,
    instability,
    loss,
    nonfinite,
    optimizer,
    units,
)
from gradscope.analysis.view import RunView
from gradscope.verdict import Verdict

Rule = Callable[[RunView], list[Verdict]]

RULES: dict[str, Rule] = {
    "nonfinite": nonfinite.check,
    "instability": instability.check,
    "accumulation": accumulation.check,
    "optimizer": optimizer.check,
    "frozen": frozen.check,
    "inputs": inputs.check,
    "flow": flow.check,
    "units": units.check,
    "loss": loss.check,
}
