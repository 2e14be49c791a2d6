"""Figures of one recording's gradients and updates: gradient profile, layer x step heatmap,
statistics over steps, update ratios, logged scalars and the verdict timeline (activations and
the residual stream: gradscope.plot.outputs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Patch

from gradscope import frame as fr
from gradscope.diagnose import UPDATE_RATIO_HIGH, UPDATE_RATIO_LOW
from gradscope.plot.common import (
    DEFAULT_LOG10_SCALE,
    LOG10_SCALES,
    SEVERITY_COLORS,
    ZERO_COLOR,
    PlotError,
    as_frame,
    draw_zeros,
    lines_by_step,
    name_ticks,
    need,
    new_axes,
    pick_steps,
    row_groups,
    steps_palette,
)
from gradscope.schema import TOTAL, Kind, Stat
from gradscope.verdict import SEVERITIES


def gradient_profile(
    data: Any,
    steps: int | Sequence[int] | str | None = None,
    *,
    theory_slope: float | None = None,
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """Gradient norm of each weight matrix against depth, one line per step, with the decay
    slope (decades lost per layer toward the input) in the legend.

    Args:
        data: the long-form frame, a Run, a Recorder or a run folder.
        steps: a step, several, "last", or None for the first, a middle and the last.
        theory_slope: a predicted decay (decades per layer, e.g. gradscope.lab.theory's) drawn as
            a dotted line through the last layer of the last step.
        ax: the Axes to draw into (a new figure by default).

    Exact zeros are drawn at the axis's floor and counted in the legend.

    Example:
        >>> import gradscope.plot as gp
        >>> from gradscope.lab.models import recorded_example
        >>> rec = recorded_example()  # a small model, watched
        >>> gp.gradient_profile(rec).get_ylabel()
        'gradient norm (log scale)'
    """
    frame = as_frame(data)
    grads = need(fr.select(frame, Kind.PARAM_GRAD, Stat.NORM), "parameter gradient norms")
    layers = fr.weight_matrices(frame)
    if not layers:
        raise PlotError("no weight matrix (parameter with ndim >= 2) in the data")
    picks = pick_steps(grads["step"], steps)
    ax = new_axes(ax, (8, 4))
    zeros: list[tuple[float, Any]] = []
    last: pd.DataFrame | None = None
    for step, color in zip(picks, steps_palette(picks), strict=True):
        prof = fr.gradient_profile(frame, step)
        norms = prof["norm"].to_numpy(dtype=float)
        slope = fr.decay_slope(norms)
        ax.plot(prof["index"], np.where(norms > 0, norms, np.nan), marker=".", color=color,
                label=f"step {step}: {slope:.3g} decades/layer")  # fmt: skip
        zeros += [(float(i), color) for i in prof["index"][norms == 0]]
        last = prof
    ax.set_yscale("log")
    if theory_slope is not None and last is not None and len(last):
        end = float(last["norm"].iloc[-1])
        depth = np.arange(len(last))
        if end > 0:
            ax.plot(depth, end * 10.0 ** (-theory_slope * (len(last) - 1 - depth)), ":",
                    color="black", label=f"theory: {theory_slope:.3g} decades/layer")  # fmt: skip
    draw_zeros(ax, zeros)
    if last is not None:
        name_ticks(ax, list(last["layer"]))
    ax.set(
        title="Gradient norm against depth (slope: decades lost per layer)",
        xlabel="weight matrix (input side at left)",
        ylabel="gradient norm (log scale)",
    )
    ax.legend(fontsize=8)
    return ax


def heatmap(
    data: Any,
    kind: Kind | str = Kind.PARAM_GRAD,
    stat: Stat | str = Stat.NORM,
    *,
    layers: Sequence[str] | None = None,
    scale: tuple[float, float] | None = None,
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """A layer x step heatmap of log10 of a statistic (default: parameter gradient norms of
    the weight matrices), input side at the top.

    The colour scale is fixed per statistic (`gradscope.plot.LOG10_SCALES`: gradient norms
    1e-10 to 1e2, update ratios 1e-8 to 1), so the same colour is the same value in every run;
    exact zeros are drawn in blue (`ZERO_COLOR`) and counted in the title, missing cells are
    blank. With more than `MAX_ROWS` layers, rows are grouped (see `row_groups`); a norm's
    group row is the root of the sum of squares, any other statistic's its maximum.

    Example:
        >>> import gradscope.plot as gp
        >>> from gradscope.lab.models import recorded_example
        >>> rec = recorded_example(steps=3)  # a small model, watched
        >>> gp.heatmap(rec).get_xlabel()
        'step'
    """
    frame = as_frame(data)
    kind, stat = str(kind), str(stat)
    if layers is None:
        layers = fr.weight_matrices(frame) if kind in (Kind.PARAM_GRAD, Kind.UPDATE) else []
        if not layers:
            layers = list(dict.fromkeys(fr.select(frame, kind, stat)["layer"]))
    layers = [name for name in layers if name != TOTAL]
    rows = need(fr.select(frame, kind, stat, layers=layers), f"{kind} {stat}")
    groups = row_groups(frame, layers)
    rows = rows.assign(group=rows["layer"].map(groups))
    if stat in (Stat.NORM, Stat.SAMPLE_NORM):
        rows = rows.assign(v=np.square(rows["value"].to_numpy(dtype=float)))
        wide = np.sqrt(rows.pivot_table(index="group", columns="step", values="v", aggfunc="sum"))
    else:
        wide = rows.pivot_table(index="group", columns="step", values="value", aggfunc="max")
    wide = wide.reindex(list(dict.fromkeys(groups[name] for name in layers))).dropna(how="all")
    low, high = scale or LOG10_SCALES.get(f"{kind}/{stat}", DEFAULT_LOG10_SCALE)
    values = wide.to_numpy(dtype=float)
    zero_count = int((values == 0).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(values)
    logs = np.where(values == 0, low - 1.0, np.clip(logs, low, high))  # zeros: 'under' colour
    cmap = plt.get_cmap("magma").with_extremes(under=ZERO_COLOR)
    ax = new_axes(ax, (11, max(3.0, min(12.0, 0.16 * len(wide) + 1.5))))
    sns.heatmap(
        pd.DataFrame(logs, index=wide.index, columns=wide.columns),
        ax=ax,
        cmap=cmap,
        vmin=low,
        vmax=high,
        cbar_kws={"label": f"log10 {stat} (fixed scale)", "extend": "both"},
        yticklabels=max(1, len(wide) // 60),
        xticklabels=max(1, wide.shape[1] // 12),
    )
    grouped = len(wide) < len(layers)
    what = "layer group" if grouped else "layer"
    note = f"; {zero_count} cell(s) exactly 0, in blue" if zero_count else ""
    ax.set(
        title=f"{kind} {stat} per {what} over steps{note}",
        xlabel="step",
        ylabel=f"{what} (input side at top)",
    )
    ax.tick_params(axis="y", labelsize=7)
    return ax


def over_steps(
    data: Any,
    kind: Kind | str = Kind.PARAM_GRAD,
    stat: Stat | str = Stat.NORM,
    *,
    layers: Sequence[str] | None = None,
    log: bool | None = None,
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """A statistic over steps, one line per chosen layer (default: the first, a middle and
    the last weight matrix, and the total norm where there is one).

    Example:
        >>> import gradscope.plot as gp
        >>> from gradscope.lab.models import recorded_example
        >>> rec = recorded_example(steps=3)  # a small model, watched
        >>> gp.over_steps(rec).get_xlabel()
        'step'
    """
    frame = as_frame(data)
    kind, stat = str(kind), str(stat)
    if layers is None:
        matrices = fr.weight_matrices(frame)
        if matrices and kind in (Kind.PARAM_GRAD, Kind.UPDATE, Kind.PARAM):
            picks = [matrices[0], matrices[len(matrices) // 2], matrices[-1]]
            layers = list(dict.fromkeys(picks + ([TOTAL] if kind == Kind.PARAM_GRAD else [])))
        else:
            layers = list(dict.fromkeys(fr.select(frame, kind, stat)["layer"]))[:6]
    rows = need(fr.select(frame, kind, stat, layers=layers), f"{kind} {stat} of {list(layers)}")
    values = rows["value"].to_numpy(dtype=float)
    if log is None:
        log = bool((values[np.isfinite(values)] > 0).all())
    ax = new_axes(ax, (8, 3.5))
    data_ = rows.assign(value=rows["value"].where(rows["value"] > 0) if log else rows["value"])
    data_ = data_.assign(layer=data_["layer"].replace({TOTAL: "all parameters"}))
    sns.lineplot(data=data_, x="step", y="value", hue="layer", marker=".", ax=ax)
    if log:
        ax.set_yscale("log")
    ax.set(title=f"{kind} {stat} over steps", xlabel="step",
           ylabel=f"{stat}" + (" (log scale)" if log else ""))  # fmt: skip
    ax.legend(fontsize=7)
    return ax


def update_ratio(
    data: Any, steps: int | Sequence[int] | str | None = None, *, ax: plt.Axes | None = None
) -> plt.Axes:
    """Update norm / weight norm of each weight matrix against depth, with the healthy band
    (`gradscope.diagnose.UPDATE_RATIO_LOW` to `_HIGH`) shaded; zeros (frozen) at the floor.

    Example:
        >>> import gradscope as gs, gradscope.plot as gp, torch
        >>> model = gs.build_model("plain", depth=4, width=16)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gs.watch(model, optimizer=opt) as rec:
        ...     model(torch.randn(8, 784)).sum().backward()
        ...     opt.step()
        >>> gp.update_ratio(rec).get_yscale()
        'log'
    """
    frame = as_frame(data)
    layers = fr.weight_matrices(frame)
    ratios = need(
        fr.select(frame, Kind.UPDATE, Stat.RATIO, layers=layers),
        "update ratios (recorded only with an optimizer)",
    )
    picks = pick_steps(ratios["step"], steps)
    ax = new_axes(ax, (8, 4))
    zeros = lines_by_step(ax, ratios, picks, layers, log=True)
    ax.axhspan(UPDATE_RATIO_LOW, UPDATE_RATIO_HIGH, color="#1b7a1b", alpha=0.08,
               label="healthy band")  # fmt: skip
    ax.set_yscale("log")
    draw_zeros(ax, zeros)
    name_ticks(ax, layers)
    ax.set(
        title="Update / weight norm per weight matrix",
        xlabel="weight matrix (input side at left)",
        ylabel="update ratio (log scale)",
    )
    ax.legend(fontsize=8)
    return ax


def scalars(
    data: Any, names: Sequence[str] | None = None, *, ax: plt.Axes | None = None
) -> plt.Axes:
    """Logged scalars (the loss, `Recorder.log_scalar`) over steps; log scale when positive.

    Example:
        >>> import gradscope as gs, gradscope.plot as gp, torch
        >>> model = torch.nn.Linear(4, 2)
        >>> with gs.watch(model) as rec:
        ...     loss = model(torch.randn(8, 4)).square().mean()
        ...     rec.log_scalar("loss", loss)
        ...     loss.backward()
        ...     rec.step()
        >>> gp.scalars(rec).get_xlabel()
        'step'
    """
    frame = as_frame(data)
    rows = fr.select(frame, Kind.SCALAR)
    if names is not None:
        rows = rows[rows["stat"].isin(list(names))]
    rows = need(rows, "logged scalars (Recorder.log_scalar; the callbacks log the loss)")
    values = rows["value"].to_numpy(dtype=float)
    log = bool((values[np.isfinite(values)] > 0).all())
    ax = new_axes(ax, (8, 3.5))
    sns.lineplot(data=rows.rename(columns={"stat": "scalar"}), x="step", y="value",
                 hue="scalar", marker=".", ax=ax)  # fmt: skip
    if log:
        ax.set_yscale("log")
    ax.set(title="Logged scalars", xlabel="step", ylabel="value" + (" (log scale)" if log else ""))
    return ax


def verdict_timeline(
    verdicts: Any, *, steps: tuple[int, int] | None = None, ax: plt.Axes | None = None
) -> plt.Axes:
    """When each verdict held: one bar per verdict from its first to its last step,
    coloured by severity (healthy verdicts included, so an all-green run shows as such).

    `verdicts` is a list of gradscope.Verdict, a Run, or a Recorder (diagnosed now).

    Example:
        >>> import gradscope as gs, gradscope.plot as gp
        >>> v = gs.Verdict("vanishing_gradients", "warning", "m", "s", first_step=2, last_step=9)
        >>> gp.verdict_timeline([v]).get_xlabel()
        'step'
    """
    if hasattr(verdicts, "verdicts"):
        verdicts = verdicts.verdicts
    elif hasattr(verdicts, "diagnose"):
        verdicts = verdicts.diagnose()
    verdicts = list(verdicts)
    if not verdicts:
        raise PlotError("no verdicts to draw (nothing was diagnosed)")
    spans = [v for v in verdicts if v.first_step is not None and v.last_step is not None]
    lo = steps[0] if steps else min((v.first_step for v in spans), default=0)
    hi = steps[1] if steps else max((v.last_step for v in spans), default=1)
    ax = new_axes(ax, (8, 0.4 * len(verdicts) + 1.2))
    for i, v in enumerate(verdicts):
        first = v.first_step if v.first_step is not None else lo
        last = v.last_step if v.last_step is not None else hi
        ax.barh(i, max(last - first, 0) + 1, left=first - 0.5, height=0.6,
                color=SEVERITY_COLORS.get(v.severity, "grey"))  # fmt: skip
    ax.set_yticks(range(len(verdicts)), [v.id for v in verdicts], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(lo - 1, hi + 1)
    handles = [Patch(color=SEVERITY_COLORS[s], label=s) for s in SEVERITIES
               if any(v.severity == s for v in verdicts)]  # fmt: skip
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set(title="When each verdict held", xlabel="step", ylabel="")
    return ax
