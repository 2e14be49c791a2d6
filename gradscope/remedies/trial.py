"""A trial's result: the baseline and each remedy rerun from the same start (TrialRun), compared
(Trial: the table, the measured gain of each, the best). try_remedies (runner.py) makes one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gradscope.remedies.core import Remedy
from gradscope.verdict import Verdict

# A remedy changes the outcome only past this relative difference in final loss: two runs
# from the same start that differ in float rounding alone stay well inside it.
TOLERANCE = 0.02
BASELINE = "baseline"


class TrialError(ValueError):
    """A trial that cannot run at all (bad arguments, a baseline that raises); says why."""


@dataclass
class TrialRun:
    """One rerun: the baseline or one remedy, its per-step losses and its verdicts.

    `skipped` is why the remedy could not apply, `failed` the error training raised; either
    leaves `losses` empty.
    """

    name: str
    remedy: Remedy | None
    losses: list[float] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    seconds: float = 0.0
    accuracy: float | None = None
    skipped: str | None = None
    failed: str | None = None

    @property
    def final_loss(self) -> float:
        """The mean loss over the last tenth of the steps (inf where it is not finite)."""
        tail = self._tail()
        if not len(tail):
            return math.nan
        value = float(np.mean(tail))
        return value if math.isfinite(value) else math.inf

    @property
    def loss_spread(self) -> float:
        """The standard deviation of the loss over the last tenth of the steps."""
        tail = self._tail()
        return float(np.std(tail)) if len(tail) and np.isfinite(tail).all() else math.nan

    def _tail(self) -> np.ndarray:
        losses = np.asarray(self.losses, dtype=float)
        return losses[-max(1, len(losses) // 10) :] if len(losses) else losses

    @property
    def problems(self) -> list[str]:
        """The ids of its warning and error verdicts, in the diagnosis's order."""
        return list(
            dict.fromkeys(v.id for v in self.verdicts if v.severity in ("warning", "error"))
        )


@dataclass
class Trial:
    """The baseline and each remedy tried from the same start (`runs`, the baseline first).

    `table()` compares them; `best` is the remedy with the largest measured gain.
    """

    runs: list[TrialRun]
    steps: int
    seed: int

    @property
    def baseline(self) -> TrialRun:
        return self.runs[0]

    def outcome(self, run: TrialRun) -> str:
        """ "better", "worse" or "no change" against the baseline's final loss; or why the
        remedy did not run."""
        if run.skipped is not None:
            return f"could not apply: {run.skipped}"
        if run.failed is not None:
            return f"failed: {run.failed}"
        if run is self.baseline:
            return ""
        gain = self.gain(run)
        if gain > 0:
            return "better"
        if gain < 0:
            return "worse"
        return "no change"

    def gain(self, run: TrialRun) -> float:
        """The relative drop of the final loss against the baseline's (positive is better);
        0 inside TOLERANCE; +-inf where only one of the two stayed finite; nan where the
        remedy did not run."""
        if run.skipped is not None or run.failed is not None or not run.losses:
            return math.nan
        base, mine = self.baseline.final_loss, run.final_loss
        if not math.isfinite(base):
            return math.inf if math.isfinite(mine) else 0.0
        if not math.isfinite(mine):
            return -math.inf
        gain = (base - mine) / abs(base) if base != 0 else -mine
        return gain if abs(gain) > TOLERANCE else 0.0

    @property
    def best(self) -> Remedy | None:
        """The remedy whose final loss beats the baseline's by most; None when none does."""
        tried = [r for r in self.runs[1:] if self.outcome(r) == "better"]
        if not tried:
            return None
        # an infinite gain (a divergence fixed) ties between remedies: the lower loss wins
        best = max(tried, key=lambda r: (self.gain(r), -r.final_loss))
        return best.remedy

    def table(self) -> pd.DataFrame:
        """One row per run, the baseline first: remedy, final_loss (mean over the last tenth),
        loss_spread, cleared and new (warning/error verdict ids, comma-separated), seconds,
        outcome, gain and code; accuracy where the trial had `eval=`."""
        base = set(self.baseline.problems)
        rows = []
        for run in self.runs:
            ran = run.skipped is None and run.failed is None
            mine = run.problems
            row = {
                "remedy": run.name,
                "final_loss": run.final_loss if ran else math.nan,
                "loss_spread": run.loss_spread if ran else math.nan,
                "cleared": ", ".join(v for v in self.baseline.problems if v not in mine)
                if ran and run is not self.baseline
                else "",
                "new": ", ".join(v for v in mine if v not in base) if ran else "",
                "seconds": run.seconds,
                "outcome": self.outcome(run),
                "gain": self.gain(run) if run is not self.baseline else 0.0,
                "code": run.remedy.code if run.remedy is not None else "",
            }
            if any(r.accuracy is not None for r in self.runs):
                row["accuracy"] = run.accuracy if run.accuracy is not None else math.nan
            rows.append(row)
        return pd.DataFrame(rows)

    def losses(self) -> pd.DataFrame:
        """Long form: remedy, step, loss (for plotting the curves side by side)."""
        parts = [
            pd.DataFrame({"remedy": run.name, "step": range(len(run.losses)), "loss": run.losses})
            for run in self.runs
            if run.losses
        ]
        if not parts:
            return pd.DataFrame(columns=["remedy", "step", "loss"])
        return pd.concat(parts, ignore_index=True)
