"""The diagnosis while training (gradscope.Recorder's `on_verdict`): incremental, cheap per
recorded step, and as quiet as the offline diagnosis.

Each recorded step updates a few running numbers (the total gradient norm, the median update
ratio and step size, any inf/NaN) and runs the early-warning checks of
gradscope.analysis.rules.instability on them at once, with its thresholds: updates as large
as the weights, a gradient leaving its baseline at an unchanged step size, a non-finite
value. The whole-run rules run over the first recorded step and the last `window` ones, as
often as keeps their cost under FULL_BUDGET of the time training takes (and at once after an
early warning); both are measured in CPU time (time.process_time), so a loaded machine,
which stretches wall time, neither makes them run more often nor inflates their share. A verdict is reported once per id, and not at all when a root cause already
reported explains it (gradscope.analysis.rank.EXPLAINS).
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from gradscope.analysis.diagnose import diagnose
from gradscope.analysis.rank import EXPLAINS
from gradscope.analysis.rules import instability
from gradscope.schema import COLUMNS, TOTAL, Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, fmt

ALARM = (Severity.WARNING, Severity.ERROR)
_clock = time.process_time
# The whole-run rules may take this share of the CPU time between their runs.
FULL_BUDGET = 0.02
MIN_FULL_EVERY = 16  # recorded steps between two whole-run diagnoses, at least
# (seconds of CPU: 33 ms for 33 steps of the 784-128-10 MLP, making its frame included)
FIRST_FULL_COST_GUESS = 0.05

Rows = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class OnlineDiagnosis:
    """Feed it each recorded step (`update` with the step's frame, or `update_rows` with its
    columns as arrays); it returns the warnings and errors not reported before.

    `window`: recorded steps the whole-run rules look back over (with the first step, which
    the input-scale rule judges).
    """

    def __init__(self, window: int = 32) -> None:
        self.window = window
        self._recent: collections.deque[Rows] = collections.deque(maxlen=window)
        self._first: Rows | None = None
        self._grad: collections.deque[float] = collections.deque(maxlen=instability.BASELINE_WINDOW)
        self._size: collections.deque[float] = collections.deque(maxlen=instability.BASELINE_WINDOW)
        self._ratio: collections.deque[float] = collections.deque(
            maxlen=instability.BASELINE_WINDOW
        )
        self._announced: set[str] = set()
        self._since_full = 0
        self._last_full_end = _clock()
        # (a guess until the first whole-run diagnosis is timed; the first then runs after
        # GUESS / FULL_BUDGET seconds of training's CPU time, 2.5 s)
        self._last_full_cost = FIRST_FULL_COST_GUESS
        self._masks: tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._keep: tuple[tuple[int, ...], list[int]] | None = None

    def update(self, step_frame: pd.DataFrame) -> list[Verdict]:
        """Adds one recorded step's rows (a frame of one step); returns the new verdicts."""
        if len(step_frame) == 0:
            return []
        return self.update_rows(
            int(step_frame["step"].iat[0]),
            step_frame["layer"].to_numpy(),
            step_frame["kind"].to_numpy(),
            step_frame["stat"].to_numpy(),
            step_frame["value"].to_numpy(dtype=float),
        )

    def update_rows(
        self,
        step: int,
        layer: np.ndarray,
        kind: np.ndarray,
        stat: np.ndarray,
        values: np.ndarray,
    ) -> list[Verdict]:
        """Adds one recorded step's rows as arrays (no frame per step: that costs more than
        the checks); returns the new verdicts."""
        rows: Rows = (step, layer, kind, stat, np.asarray(values, dtype=float))
        if self._first is None:
            self._first = rows
        self._recent.append(rows)
        self._since_full += 1
        found = self._early(step, layer, kind, stat, rows[4])
        now = _clock()
        due = (
            self._since_full >= MIN_FULL_EVERY
            and (now - self._last_full_end) * FULL_BUDGET >= self._last_full_cost
        )
        if due or any(v.severity in ALARM for v in found):
            found += [v for v in diagnose(self._window()) if v.severity in ALARM]
            end = _clock()
            self._last_full_cost, self._last_full_end, self._since_full = end - now, end, 0
        return self._announce(found)

    def _announce(self, found: list[Verdict]) -> list[Verdict]:
        new = []
        for verdict in found:
            explained = any(verdict.id in EXPLAINS.get(root, set()) for root in self._announced)
            if verdict.id not in self._announced and not explained:
                self._announced.add(verdict.id)
                new.append(verdict)
        return new

    def _window(self) -> pd.DataFrame:
        parts = list(self._recent)
        if self._first is not None and self._first[0] != parts[0][0]:
            parts.insert(0, self._first)
        frames = [
            pd.DataFrame(
                {
                    "step": np.full(len(v), s, dtype=np.int64),
                    "layer": la,
                    "kind": k,
                    "stat": st,
                    "value": v,
                },
                columns=list(COLUMNS),
            )
            for s, la, k, st, v in parts
        ]
        return pd.concat(frames, ignore_index=True)

    def _layout(
        self, layer: np.ndarray, kind: np.ndarray, stat: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Row indices of the step's layout, cached while the layout stays the same object
        (the recorder reuses it from step to step)."""
        if self._masks is None or self._masks[0] != id(layer):
            total = np.flatnonzero(
                (kind == Kind.PARAM_GRAD) & (stat == Stat.NORM) & (layer == TOTAL)
            )
            ratio = np.flatnonzero((kind == Kind.UPDATE) & (stat == Stat.RATIO))
            size = np.flatnonzero((kind == Kind.UPDATE) & (stat == Stat.STEP_SIZE))
            bad = np.flatnonzero(stat == Stat.NONFINITE)
            self._masks = (id(layer), total, ratio, size, bad)
        return self._masks[1:]

    def _early(
        self, step: int, layer: np.ndarray, kind: np.ndarray, stat: np.ndarray, values: np.ndarray
    ) -> list[Verdict]:
        """The early-warning checks on this step's rows against the running baseline
        (plain Python on a handful of numbers: numpy's per-call cost would dominate)."""
        total, ratio, size, bad = self._layout(layer, kind, stat)
        grad = float(values[total[0]]) if len(total) else math.nan
        nonfinite = bool(values[bad].any()) or (len(total) > 0 and not math.isfinite(grad))
        r = _median_finite(values[ratio].tolist())
        s = _median_finite(values[size].tolist())
        return self._check(step, grad, r, s, nonfinite)

    def update_numbers(
        self,
        step: int,
        grad_sumsq: np.ndarray,
        param_sumsq: np.ndarray,
        update_sumsq: np.ndarray | None,
        ndims: list[int],
        nonfinite: float,
        frame: Callable[[], pd.DataFrame],
    ) -> list[Verdict]:
        """Adds one recorded step as the recorder holds it before making rows (per present
        parameter: gradient, weight and update sums of squares, and ndim; the step's count
        of inf/NaN), so rows can still be made later, in batches; `frame()` returns the
        recording so far for the whole-run rules. Returns the new verdicts."""
        grad = math.sqrt(float(grad_sumsq.sum())) if len(grad_sumsq) else math.nan
        r = s = math.nan
        if update_sumsq is not None and len(update_sumsq):
            # plain Python on a few numbers: numpy's per-call cost on tiny arrays (and
            # errstate's) was most of this method's 40 us a step
            keep = self._matrices(ndims)
            u, p, g = update_sumsq.tolist(), param_sumsq.tolist(), grad_sumsq.tolist()
            r = _median_finite([math.sqrt(u[i] / p[i]) for i in keep if p[i] > 0])
            s = _median_finite([math.sqrt(u[i] / g[i]) for i in keep if g[i] > 0])
        found = self._check(step, grad, r, s, nonfinite > 0 or not math.isfinite(grad))
        self._since_full += 1
        now = _clock()
        due = (
            self._since_full >= MIN_FULL_EVERY
            and (now - self._last_full_end) * FULL_BUDGET >= self._last_full_cost
        )
        if due or any(v.severity in ALARM for v in found):
            found += [v for v in diagnose(self._recent_steps(frame())) if v.severity in ALARM]
            end = _clock()
            self._last_full_cost, self._last_full_end, self._since_full = end - now, end, 0
        return self._announce(found)

    def _matrices(self, ndims: list[int]) -> list[int]:
        """The weight matrices' indices (every parameter's where there are none), cached
        while the layout stays the same."""
        key = tuple(ndims)
        if self._keep is None or self._keep[0] != key:
            keep = [i for i, n in enumerate(ndims) if n >= 2] or list(range(len(ndims)))
            self._keep = (key, keep)
        return self._keep[1]

    def _recent_steps(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The first recorded step (the input-scale rule judges it) and the last `window`."""
        steps = np.unique(frame["step"].to_numpy())
        keep = np.concatenate([steps[:1], steps[-self.window :]])
        return frame[np.isin(frame["step"].to_numpy(), keep)]

    def _check(self, step: int, grad: float, r: float, s: float, nonfinite: bool) -> list[Verdict]:
        """instability's checks on this step's numbers against the running baselines."""
        g_base = _median(self._grad)
        s_base = _median(self._size)
        r_base = _median(self._ratio)
        grad_jump = grad / g_base if g_base > 0 and math.isfinite(grad) else math.nan
        size_jump = s / s_base if s_base > 0 and math.isfinite(s) else math.nan
        if math.isfinite(grad):
            self._grad.append(grad)
        if math.isfinite(s):
            self._size.append(s)
        if math.isfinite(r):
            self._ratio.append(r)
        out: list[Verdict] = []
        if grad_jump >= instability.GRAD_JUMP and not size_jump >= instability.STEP_SIZE_JUMP:
            what = f"the gradient jumped to {fmt(grad_jump)} times its recent median"
            out.append(_early(VerdictId.GRADIENT_SPIKE, step, what, grad_jump))
        elif r >= instability.UPDATE_RATIO_HIGH or (
            r_base > 0
            and r >= instability.UPDATE_JUMP * r_base
            and r >= instability.UPDATE_JUMP_FLOOR
        ):
            what = f"updates are {fmt(r)} of the weights' norm"
            out.append(_early(VerdictId.LR_TOO_HIGH, step, what, r))
        if nonfinite:
            out.append(_early(VerdictId.NONFINITE_VALUES, step, "inf/NaN appeared", math.nan))
        return out


def _median(values: collections.deque[float]) -> float:
    if len(values) < instability.MIN_HISTORY:
        return math.nan
    return statistics.median(values)


def _median_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _early(vid: VerdictId, step: int, what: str, value: float) -> Verdict:
    return Verdict(
        vid,
        Severity.ERROR if vid == VerdictId.NONFINITE_VALUES else Severity.WARNING,
        f"{what} at step {step} (early warning: the whole-run diagnosis says more)",
        "lower the learning rate, clip gradients at norm 1.0, and look at this step's batch",
        [],
        {"step": step, "value": value},
        None,
        step,
        step,
    )
