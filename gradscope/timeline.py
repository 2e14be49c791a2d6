"""Helpers over the time axis of a recording: step x layer tables, spikes against a robust
trailing baseline (with the layer that moved first), per-column trends, the logged loss.

Pure functions over the long-form frame. The verdicts over time are gradscope.analysis's
rules (instability, flow, units); these helpers serve figures and exploration.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradscope import frame as fr
from gradscope.schema import TOTAL, Kind, Stat

# A spike: a step-to-step change SPIKE_Z robust deviations above the usual change over the
# previous SPIKE_WINDOW recorded steps (the MAD scaled to a Gaussian sigma; z 6 happens about
# once in 10^9 Gaussian draws), to a value at least SPIKE_FACTOR times the median of those
# steps (so series whose changes are tiny do not fire on ordinary noise). Before
# SPIKE_MIN_HISTORY steps there is no baseline.
SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 8
SPIKE_Z = 6.0
SPIKE_FACTOR = 3.0
# A trend is fitted over at least this many positive values.
TREND_MIN_STEPS = 10


def wide(
    frame: pd.DataFrame, kind: Kind, stat: Stat, layers: list[str] | None = None
) -> pd.DataFrame:
    """One statistic as a step x layer table (steps ascending, layers in frame order)."""
    rows = fr.select(frame, kind, stat, layers=layers)
    table = rows.pivot_table(index="step", columns="layer", values="value", aggfunc="first")
    order = layers if layers is not None else list(dict.fromkeys(rows["layer"]))
    return table.reindex(columns=[c for c in order if c in table.columns]).sort_index()


def spikes(table: pd.DataFrame, log: bool = True) -> pd.DataFrame:
    """Where each column first leaves its robust trailing baseline.

    A spike at step t: the change from the previous recorded step exceeds the median change
    over the previous SPIKE_WINDOW steps by SPIKE_Z robust deviations (their MAD, scaled to
    a Gaussian sigma: a series that trends smoothly has small deviations, so its trend is no
    spike), and the value is at least SPIKE_FACTOR times the median of those steps. Values
    are compared as log10 (`log`) or as they are. Non-finite values count as spikes.

    Returns one row per column that spikes: `layer`, `step`, `z` (robust deviations of the
    change) and `factor` (value / trailing median), inf for non-finite values.
    """
    values = table.astype(float)
    finite = np.isfinite(values)
    x = np.log10(values.where(values > 0)) if log else values.where(finite)
    change = x.diff()
    usual = change.shift(1).rolling(SPIKE_WINDOW, min_periods=SPIKE_MIN_HISTORY).median()
    spread = (change - usual).abs().shift(1).rolling(SPIKE_WINDOW, min_periods=SPIKE_MIN_HISTORY)
    scale = 1.4826 * spread.median()
    level = x.shift(1).rolling(SPIKE_WINDOW, min_periods=SPIKE_MIN_HISTORY).median()
    above = x - level
    floor = math.log10(SPIKE_FACTOR) if log else (SPIKE_FACTOR - 1.0) * level.abs()
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (change - usual) / scale
        fired = (change - usual > SPIKE_Z * scale) & (above > floor) & level.notna()
    fired |= ~finite & level.notna() & table.notna()
    out = []
    for column in table.columns:
        hits = fired.index[fired[column].to_numpy()]
        if len(hits):
            step = hits[0]
            if bool(finite.at[step, column]):
                jump = float(above.at[step, column])
                factor = 10**jump if log else 1.0 + jump / abs(float(level.at[step, column]))
                zed = float(z.at[step, column])
            else:
                factor = zed = math.inf
            out.append((column, int(step), zed if math.isfinite(zed) else math.inf, factor))
    return pd.DataFrame(out, columns=["layer", "step", "z", "factor"])


def loss_series(frame: pd.DataFrame) -> pd.Series:
    """The logged loss by step (scalar "loss"), empty where none was logged."""
    rows = fr.select(frame, Kind.SCALAR, Stat.LOSS)
    return rows.groupby("step")["value"].last().sort_index()


def first_loss_spike(frame: pd.DataFrame) -> tuple[int, float] | None:
    """(step, factor) where the logged loss first jumps off its baseline or turns non-finite."""
    loss = loss_series(frame)
    if loss.empty:
        return None
    positive = bool((loss[np.isfinite(loss)] > 0).all())
    hit = spikes(loss.to_frame("loss"), log=positive)
    if hit.empty:
        return None
    return int(hit["step"].iloc[0]), float(hit["factor"].iloc[0])


def gradient_spikes(frame: pd.DataFrame) -> pd.DataFrame:
    """The first spike of each gradient norm (total and per weight matrix) and update ratio,
    earliest first (ties: the largest jump first). Columns: layer, stat, step, z, factor."""
    matrices = fr.weight_matrices(frame)
    parts = []
    for kind, stat, layers in (
        (Kind.PARAM_GRAD, Stat.NORM, [TOTAL, *matrices]),
        (Kind.UPDATE, Stat.RATIO, matrices),
    ):
        table = wide(frame, kind, stat, layers)
        if len(table) > SPIKE_MIN_HISTORY:
            hit = spikes(table)
            parts.append(hit.assign(stat=f"{kind}.{stat}"))
    if not parts:
        return pd.DataFrame(columns=["layer", "stat", "step", "z", "factor"])
    hits = pd.concat(parts, ignore_index=True)
    return hits.sort_values(["step", "factor"], ascending=[True, False]).reset_index(drop=True)


def trend(table: pd.DataFrame) -> pd.DataFrame:
    """Per column: the least-squares slope of log10(value) against step, in decades per 100
    steps, and the fit's R^2 (columns with fewer than TREND_MIN_STEPS positive values are
    left out)."""
    out = []
    steps = table.index.to_numpy(dtype=float)
    for column in table.columns:
        y = table[column].to_numpy(dtype=float)
        keep = np.isfinite(y) & (y > 0)
        if keep.sum() < TREND_MIN_STEPS or np.ptp(steps[keep]) == 0:
            continue
        xs, ys = steps[keep], np.log10(y[keep])
        slope, intercept = np.polyfit(xs, ys, 1)
        residual = ys - (slope * xs + intercept)
        total = ((ys - ys.mean()) ** 2).sum()
        r2 = 1.0 - (residual**2).sum() / total if total > 0 else 0.0
        out.append((column, 100.0 * slope, r2))
    return pd.DataFrame(out, columns=["layer", "decades_per_100_steps", "r2"])
