"""A few headline scalars of one recorded step, for a trainer's logger: not hundreds of
series, but the numbers that say whether gradients flow."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from gradscope import frame as fr
from gradscope.diagnose import SEVERITIES, diagnose
from gradscope.schema import TOTAL, Kind, Stat

PREFIX = "gradscope/"
SEVERITY_LEVEL = {name: float(i) for i, name in enumerate(SEVERITIES)}  # ok 0 ... error 3


def headline(step_frame: pd.DataFrame, verdicts: list[Any] | None = None) -> dict[str, float]:
    """From the rows of one recorded step: the total gradient norm, the first/last gradient
    ratio, the decay slope (decades lost per layer), the logged loss and the worst verdict's
    severity level (0 ok, 1 info, 2 warning, 3 error), each under the ``gradscope/`` prefix.

    Example:
        >>> rows = [(0, "*", "param_grad", "norm", 2.0)]
        >>> headline(pd.DataFrame(rows, columns=["step", "layer", "kind", "stat", "value"]))
        {'gradscope/grad_norm': 2.0, 'gradscope/worst_severity': 0.0}
    """
    if step_frame.empty:
        return {}
    out = {}
    total = fr.select(step_frame, Kind.PARAM_GRAD, Stat.NORM, layers=[TOTAL])
    if len(total):
        out[PREFIX + "grad_norm"] = float(total["value"].iloc[-1])
    step = int(step_frame["step"].max())
    norms = fr.gradient_profile(step_frame, step)["norm"].to_numpy()
    if len(norms) >= 2:
        for name, value in (
            ("grad_ratio_first_last", fr.first_last_ratio(norms)),
            ("grad_decay_per_layer", fr.decay_slope(norms)),
        ):
            if math.isfinite(value):
                out[PREFIX + name] = value
    loss = fr.select(step_frame, Kind.SCALAR, Stat.LOSS)
    if len(loss):
        out[PREFIX + "loss"] = float(loss["value"].iloc[-1])
    if verdicts is None:  # a caller that diagnosed this step already passes them
        verdicts = diagnose(step_frame, step)
    out[PREFIX + "worst_severity"] = max(SEVERITY_LEVEL[v.severity] for v in verdicts)
    return out


class NewHeadlines:
    """The headline of a recorder's newest recorded step, once per step: what a trainer
    callback logs after each batch (None when no new step was recorded since)."""

    def __init__(self) -> None:
        self._logged_step = -1

    @property
    def step(self) -> int:
        """The recorded step of the last headline returned (-1 before the first)."""
        return self._logged_step

    def __call__(self, recorder: Any) -> dict[str, float] | None:
        last = recorder.last_step_frame()
        if last.empty or int(last["step"].iloc[0]) == self._logged_step:
            return None
        self._logged_step = int(last["step"].iloc[0])
        return headline(last)
