"""The diagnosis while training (gradscope.Recorder's `on_verdict`): incremental, cheap per
recorded step, and as quiet as the offline diagnosis.

Each recorded step updates a few running numbers (the total gradient norm, the median update
ratio and step size, any inf/NaN) and runs the early-warning checks on them at once: updates
as large as the weights, a step-size jump, a gradient leaving its baseline, a non-finite
value. The whole-run rules (gradient flow, units, the optimizer, zeroing) run every
`full_every` recorded steps over the window of recent steps. Each verdict id is reported once.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pandas as pd

from gradscope.analysis.diagnose import diagnose
from gradscope.analysis.rules import instability
from gradscope.schema import TOTAL, Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, fmt

ALARM = (Severity.WARNING, Severity.ERROR)


class OnlineDiagnosis:
    """Feed it each recorded step's rows (`update`); it returns the verdicts not reported
    before. `window`: recorded steps the whole-run rules look back over; `full_every`: how
    often they run (recorded steps)."""

    def __init__(self, window: int = 32, full_every: int = 16) -> None:
        self.window = window
        self.full_every = full_every
        self._steps: collections.deque[pd.DataFrame] = collections.deque(maxlen=window)
        self._grad: collections.deque[float] = collections.deque(maxlen=instability.BASELINE_WINDOW)
        self._size: collections.deque[float] = collections.deque(maxlen=instability.BASELINE_WINDOW)
        self._announced: set[str] = set()
        self._count = 0
        self._cols: tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _masks(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Row masks of the step's layout (the same from step to step: cached by length)."""
        n = len(frame)
        if self._cols is None or self._cols[0] != n:
            kind, stat = frame["kind"].to_numpy(), frame["stat"].to_numpy()
            layer = frame["layer"].to_numpy()
            total = (kind == Kind.PARAM_GRAD) & (stat == Stat.NORM) & (layer == TOTAL)
            ratio = (kind == Kind.UPDATE) & (stat == Stat.RATIO)
            size = (kind == Kind.UPDATE) & (stat == Stat.STEP_SIZE)
            bad = stat == Stat.NONFINITE
            self._cols = (n, total, ratio, size, bad)
        return self._cols[1:]

    def update(self, step_frame: pd.DataFrame) -> list[Verdict]:
        """Adds one recorded step's rows; returns the warnings and errors not reported before."""
        if len(step_frame) == 0:
            return []
        self._count += 1
        self._steps.append(step_frame)
        step = int(step_frame["step"].iat[0])
        values = step_frame["value"].to_numpy(dtype=float)
        total, ratio, size, bad = self._masks(step_frame)
        found = self._early(step, values, total, ratio, size, bad)
        if self._count % self.full_every == 0 or found:
            window = pd.concat(self._steps, ignore_index=True)
            found += [v for v in diagnose(window) if v.severity in ALARM]
        new = []
        for verdict in found:
            if verdict.id not in self._announced:
                self._announced.add(verdict.id)
                new.append(verdict)
        return new

    def _early(
        self,
        step: int,
        values: np.ndarray,
        total: np.ndarray,
        ratio: np.ndarray,
        size: np.ndarray,
        bad: np.ndarray,
    ) -> list[Verdict]:
        """The early-warning checks on this step's numbers against the running baseline."""
        grad = float(values[total][0]) if total.any() else math.nan
        ratios = values[ratio]
        ratios = ratios[np.isfinite(ratios)]
        sizes = values[size]
        sizes = sizes[np.isfinite(sizes)]
        r = float(np.median(ratios)) if len(ratios) else math.nan
        s = float(np.median(sizes)) if len(sizes) else math.nan
        g_base = (
            float(np.median(self._grad)) if len(self._grad) >= instability.MIN_HISTORY else math.nan
        )
        s_base = (
            float(np.median(self._size)) if len(self._size) >= instability.MIN_HISTORY else math.nan
        )
        out: list[Verdict] = []
        nonfinite = bool(np.any(values[bad] > 0)) or not math.isfinite(grad)
        size_jump = s / s_base if s_base > 0 and math.isfinite(s) else math.nan
        grad_jump = grad / g_base if g_base > 0 else math.nan
        if math.isfinite(r) and r >= instability.UPDATE_RATIO_HIGH:
            out.append(
                self._verdict(
                    VerdictId.LR_TOO_HIGH, step, f"updates are {fmt(r)} of the weights' norm", r
                )
            )
        elif (
            grad_jump >= instability.GRAD_JUMP or (nonfinite and not math.isfinite(grad))
        ) and not (size_jump >= instability.STEP_SIZE_JUMP):
            out.append(
                self._verdict(
                    VerdictId.GRADIENT_SPIKE,
                    step,
                    f"the gradient jumped to {fmt(grad_jump)} times its recent median",
                    grad_jump,
                )
            )
        elif size_jump >= instability.STEP_SIZE_JUMP and grad_jump >= 1:
            out.append(
                self._verdict(
                    VerdictId.LR_TOO_HIGH,
                    step,
                    f"the step size jumped {fmt(size_jump)}x",
                    size_jump,
                )
            )
        if math.isfinite(grad):
            self._grad.append(grad)
        if math.isfinite(s):
            self._size.append(s)
        if nonfinite:
            out.append(
                self._verdict(VerdictId.NONFINITE_VALUES, step, "inf/NaN appeared", math.nan)
            )
        return out

    @staticmethod
    def _verdict(vid: VerdictId, step: int, what: str, value: float) -> Verdict:
        return Verdict(
            vid,
            Severity.ERROR if vid == VerdictId.NONFINITE_VALUES else Severity.WARNING,
            f"{what} at step {step}",
            "lower the learning rate, clip gradients at norm 1.0, and look at this step's batch",
            [],
            {"step": step, "value": value},
            None,
            step,
            step,
        )
