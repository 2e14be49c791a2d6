"""`diagnose`: every rule over a frame, then one verdict per root cause, ranked."""

from __future__ import annotations

from typing import Any

import pandas as pd

from gradscope.analysis.rank import rank
from gradscope.analysis.rules import RULES
from gradscope.analysis.view import RunView
from gradscope.schema import Severity, VerdictId
from gradscope.verdict import Verdict


def findings(frame: pd.DataFrame, model: dict[str, Any] | None = None) -> list[Verdict]:
    """What each rule finds, before ranking (symptoms included)."""
    view = RunView(frame, model)
    out: list[Verdict] = []
    for rule in RULES.values():
        out += rule(view)
    return out


def diagnose(
    frame: pd.DataFrame, step: int | None = None, model: dict[str, Any] | None = None
) -> list[Verdict]:
    """Verdicts over a recorder frame: over the whole recording, or at one `step`.

    `model`: the recorder's model summary (`Recorder.model_summary`, run.json's "model"),
    where there is one: it names the frozen parameters, which the frame cannot show.

    One verdict per root cause, the most important first, each saying over which steps it
    holds (`first_step`, `last_step`) and which symptoms it explains (`explains`, with their
    messages under `evidence["symptoms"]`). A `healthy` verdict when no rule fires; `info`
    verdicts (a frozen backbone) come after the others.

    Example:
        >>> [v.id for v in diagnose(pd.DataFrame(columns=["step", "layer", "kind", "stat", "value"]))]
        ['healthy']
    """
    if step is not None:
        frame = frame[frame["step"] == step]
    if len(frame) == 0:
        return [
            Verdict(VerdictId.HEALTHY, Severity.OK, "nothing was recorded, so nothing is wrong", "")
        ]
    verdicts = rank(findings(frame, model))
    if not any(v.severity in (Severity.WARNING, Severity.ERROR) for v in verdicts):
        first, last = int(frame["step"].min()), int(frame["step"].max())
        verdicts.insert(
            0,
            Verdict(
                VerdictId.HEALTHY,
                Severity.OK,
                "no rule fired: gradients flow, the optimizer steps every "
                "parameter that has a gradient, no dead or saturated layers, no inf/NaN, no "
                "divergence or spike",
                "",
                [],
                {},
                None,
                first,
                last,
            ),
        )
    return verdicts
