"""Unnormalized inputs: the first module's outputs far from unit scale at the first recorded
step (before updates change its weights: a learning rate far too high also makes them
large, a few steps later)."""

from __future__ import annotations

from gradscope.analysis.view import RunView
from gradscope.schema import Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, fmt

# A default-initialized first layer fed inputs of unit scale gives outputs of rms 0.3 to 1.5
# (the tuning half's healthy runs: 0.55 to 1.4); ten times more means the inputs are not.
RMS_HIGH = 10.0


def check(view: RunView) -> list[Verdict]:
    acts = view.table(Kind.ACTIVATION, Stat.RMS)
    if acts.empty:
        return []
    first = str(acts.columns[0])
    early = acts[first].dropna().iloc[:1]
    if early.empty:
        return []
    rms = float(early.iloc[0])
    if not rms >= RMS_HIGH:
        return []
    return [
        Verdict(
            VerdictId.UNNORMALIZED_INPUTS,
            Severity.WARNING,
            f"the first layer ({first}) puts out values of rms {fmt(rms)} at the start, "
            f"{fmt(rms / 0.6)} times what unit-scale inputs give: the inputs are not normalized",
            "standardize the inputs (subtract the mean, divide by the std per feature or "
            "channel), e.g. transforms.Normalize, or put a LayerNorm/BatchNorm first",
            [first],
            {"rms": rms},
            RMS_HIGH,
            int(early.index[0]),
            int(view.steps[-1]),
        )
    ]
