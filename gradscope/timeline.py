"""Rules over the time axis of a recording: spikes against a robust trailing baseline (with
the layer that moved first), and trends over training (gradient growth, frozen layers, dead
units that accumulate, a loss that does not decrease).

Pure functions over the long-form frame; `gradscope.diagnose` calls them for a whole run.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradscope import frame as fr
from gradscope.schema import TOTAL, Kind, Stat
from gradscope.verdict import Verdict, fmt

# A spike: a step-to-step change SPIKE_Z robust deviations above the usual change over the
# previous SPIKE_WINDOW recorded steps (the MAD scaled to a Gaussian sigma; z 6 happens about
# once in 10^9 Gaussian draws), to a value at least SPIKE_FACTOR times the median of those
# steps (so series whose changes are tiny do not fire on ordinary noise). Before
# SPIKE_MIN_HISTORY steps there is no baseline.
SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 8
SPIKE_Z = 6.0
SPIKE_FACTOR = 3.0
# Gradient norms that change by more than this many decades per 100 steps, on a fit that
# explains most of the variance (R^2), grow or shrink exponentially over training.
TREND_DECADES_PER_100 = 0.5
TREND_R2 = 0.8
TREND_MIN_STEPS = 10
# A layer whose update ratio is below diagnose.UPDATE_RATIO_LOW on this share of the recorded
# steps is frozen: it is not learning.
FROZEN_SHARE = 0.8
# Dead or saturated fractions rising by this much from the first to the last recorded step,
# to above half of the outputs, are accumulating.
RISE = 0.25
RISE_END = 0.5
# The loss's median over the last quarter of the run at or above this share of its median
# over the first quarter: it is not decreasing.
LOSS_FLAT = 0.98
LOSS_MIN_POINTS = 20


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


# -- verdicts ------------------------------------------------------------------------------


def spike_verdicts(frame: pd.DataFrame) -> list[Verdict]:
    """`gradient_spike` (the layer whose gradient left its baseline first, and its lead over
    the loss) and `loss_spike`."""
    out = []
    loss_hit = first_loss_spike(frame)
    last = int(frame["step"].max())
    hits = gradient_spikes(frame)
    if len(hits):
        first = hits.iloc[0]
        step = int(first["step"])
        named = [h for h in dict.fromkeys(hits["layer"]) if h != TOTAL] or [TOTAL]
        loss_step = loss_hit[0] if loss_hit is not None else None
        lead = loss_step - step if loss_step is not None else None
        where = "the total gradient norm" if first["layer"] == TOTAL else first["layer"]
        after = ""
        if lead is not None and lead > 0:
            after = f", {lead} steps before the loss did (step {loss_step})"
        elif lead == 0:
            after = ", at the step the loss did"
        out.append(
            Verdict(
                "gradient_spike",
                "warning",
                f"{where} ({first['stat']}) jumped {fmt(float(first['factor']))}x above its "
                f"trailing median at step {step}{after}; {len(named)} layer(s) spiked",
                "lower the learning rate or warm it up, clip gradients at norm 1.0, or "
                "checkpoint before this step and look at the batch",
                named[:20],
                {
                    "first_step": step,
                    "first_layer": str(first["layer"]),
                    "statistic": str(first["stat"]),
                    "factor": float(first["factor"]),
                    "robust_z": float(first["z"]),
                    "loss_spike_step": loss_step,
                    "lead_steps": lead,
                    "layers_spiked": len(named),
                },
                SPIKE_Z,
                step,
                last,
            )
        )
    if loss_hit is not None:
        step, factor = loss_hit
        out.append(
            Verdict(
                "loss_spike",
                "error" if not math.isfinite(factor) else "warning",
                f"the loss jumped {fmt(factor)}x above its trailing median at step {step}",
                "lower the learning rate, clip gradients, or look at the batch of that step",
                [],
                {"step": step, "factor": factor},
                SPIKE_Z,
                step,
                last,
            )
        )
    return out


def trend_verdicts(frame: pd.DataFrame, update_floor: float) -> list[Verdict]:
    """`gradient_growth`, `frozen_layers`, `dead_units_rising`, `saturated_units_rising`,
    `loss_not_decreasing`."""
    out: list[Verdict] = []
    steps = sorted(frame["step"].unique())
    if len(steps) < 2:
        return out
    first_step, last_step = int(steps[0]), int(steps[-1])
    matrices = fr.weight_matrices(frame)
    fits = trend(wide(frame, Kind.PARAM_GRAD, Stat.NORM, matrices))
    growing = fits[
        (fits["decades_per_100_steps"] > TREND_DECADES_PER_100) & (fits["r2"] > TREND_R2)
    ]
    if len(growing):
        worst = growing.loc[growing["decades_per_100_steps"].idxmax()]
        out.append(
            Verdict(
                "gradient_growth",
                "warning",
                f"gradient norms of {len(growing)} weight matrices grow exponentially over "
                f"training (fastest {worst['layer']}: {fmt(float(worst['decades_per_100_steps']))}"
                f" decades per 100 steps, R^2 {float(worst['r2']):.2f})",
                "lower the learning rate, add normalization, or clip gradients",
                list(growing["layer"]),
                {
                    "decades_per_100_steps": dict(
                        zip(growing["layer"], growing["decades_per_100_steps"], strict=True)
                    )
                },
                TREND_DECADES_PER_100,
                first_step,
                last_step,
            )
        )
    ratios = wide(frame, Kind.UPDATE, Stat.RATIO, matrices)
    if len(ratios) >= 5:
        share = (ratios < update_floor).mean()
        frozen = share[share >= FROZEN_SHARE]
        if len(frozen):
            out.append(
                Verdict(
                    "frozen_layers",
                    "warning",
                    f"{len(frozen)} weight matri(ces) barely move: update/weight ratio below "
                    f"{update_floor:g} on {float(frozen.min()):.0%} or more of the recorded steps",
                    "raise the learning rate for these layers, or check that their gradients "
                    "are not vanishing",
                    list(frozen.index),
                    {"share_of_steps": {k: float(v) for k, v in frozen.items()}},
                    FROZEN_SHARE,
                    first_step,
                    last_step,
                )
            )
    stream = set(fr.stream_layers(frame))
    for stat, vid, what in (
        (Stat.ZERO_FRAC, "dead_units_rising", "dead (exactly zero) outputs"),
        (Stat.SATURATED_FRAC, "saturated_units_rising", "saturated outputs"),
    ):
        table = wide(frame, Kind.ACTIVATION, stat)
        table = table[[c for c in table.columns if c not in stream]]
        if len(table) < 2:
            continue
        start, end = table.iloc[0], table.iloc[-1]
        rising = table.columns[((end - start) > RISE) & (end > RISE_END)]
        if len(rising):
            out.append(
                Verdict(
                    vid,
                    "warning",
                    f"{len(rising)} layer(s) where {what} rose over training to more than "
                    f"{RISE_END:.0%} (e.g. {rising[0]}: {float(start[rising[0]]):.0%} -> "
                    f"{float(end[rising[0]]):.0%})",
                    "lower the learning rate, use a leaky activation (GELU), or normalize inputs",
                    list(rising),
                    {
                        "start": {k: float(start[k]) for k in rising},
                        "end": {k: float(end[k]) for k in rising},
                    },
                    RISE,
                    first_step,
                    last_step,
                )
            )
    loss = loss_series(frame)
    loss = loss[np.isfinite(loss)]
    if len(loss) >= LOSS_MIN_POINTS:
        quarter = len(loss) // 4
        head, tail = float(loss.iloc[:quarter].median()), float(loss.iloc[-quarter:].median())
        if head > 0 and tail >= LOSS_FLAT * head:
            out.append(
                Verdict(
                    "loss_not_decreasing",
                    "warning",
                    f"the loss did not decrease: median {fmt(tail)} over the last quarter of "
                    f"the run against {fmt(head)} over the first",
                    "check the learning rate (too low, or so high it oscillates), the labels "
                    "and the gradient flow verdicts",
                    [],
                    {"first_quarter_median": head, "last_quarter_median": tail},
                    LOSS_FLAT,
                    int(loss.index[0]),
                    int(loss.index[-1]),
                )
            )
    return out
