"""What every figure shares: the input it accepts, its clear errors, the fixed colour scales,
the grouping of many layers into readable rows, zeros drawn at a log axis's floor."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from gradscope import frame as fr
from gradscope.schema import COLUMNS

# The heatmap's colour scale is fixed, not fitted to each run, so that the same colour means
# the same norm in every report: a healthy net's 1.5 decades then look mild and a plain deep
# stack's 11 decades alarming. log10 limits per statistic; values beyond are drawn at the end
# colour, exact zeros in ZERO_COLOR.
LOG10_SCALES: dict[str, tuple[float, float]] = {
    "param_grad/norm": (-10.0, 2.0),
    "activation_grad/norm": (-10.0, 2.0),
    "activation_grad/sample_norm": (-10.0, 2.0),
    "update/ratio": (-8.0, 0.0),
    "activation/rms": (-4.0, 4.0),
}
DEFAULT_LOG10_SCALE = (-10.0, 2.0)
ZERO_COLOR = "#2b8cbe"  # exact zeros: a colour outside the magma scale, named in the legend
MAX_ROWS = 64  # layer rows in a heatmap before consecutive layers are grouped
SEVERITY_COLORS = {"ok": "#1b7a1b", "info": "#4a6fa5", "warning": "#d08c00", "error": "#b00020"}


class PlotError(ValueError):
    """Input a figure cannot be drawn from; the message says what is missing."""


def as_frame(data: Any) -> pd.DataFrame:
    """The long-form frame of `data`: a frame, a gradscope Run, a Recorder, or a run folder.

    Raises:
        PlotError: not one of these, or a frame without the recorder's columns, or no rows.
    """
    if isinstance(data, str | os.PathLike):
        from gradscope.runs import load_run

        data = load_run(Path(data))
    if hasattr(data, "frame") and isinstance(data.frame, pd.DataFrame):
        data = data.frame
    elif hasattr(data, "to_frame") and not isinstance(data, pd.DataFrame | pd.Series):
        data = data.to_frame()
    if not isinstance(data, pd.DataFrame):
        raise PlotError(
            f"expected a long-form frame, a Run, a Recorder or a run folder, got "
            f"{type(data).__name__}"
        )
    missing = [c for c in COLUMNS if c not in data.columns]
    if missing:
        raise PlotError(f"the frame lacks the column(s) {missing}; expected {list(COLUMNS)}")
    if data.empty:
        raise PlotError("the frame is empty: nothing was recorded")
    return data


def need(rows: pd.DataFrame, what: str, column: str = "value") -> pd.DataFrame:
    """`rows`, or a PlotError naming `what` when there are none or none is finite."""
    if rows.empty:
        raise PlotError(f"no {what} in the data")
    values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(values).any():
        raise PlotError(f"every {what} value is NaN or infinite: nothing to draw")
    return rows


def new_axes(ax: plt.Axes | None, size: tuple[float, float]) -> plt.Axes:
    """`ax`, or the Axes of a new figure of `size` inches."""
    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=size)
    return new


def pick_steps(available: Iterable[int], steps: int | Sequence[int] | str | None) -> list[int]:
    """The steps to draw: given ones that were recorded, "last", or first, middle and last."""
    have = sorted({int(s) for s in available})
    if not have:
        raise PlotError("no recorded step holds this statistic")
    if steps is None:
        return list(dict.fromkeys([have[0], have[len(have) // 2], have[-1]]))
    if steps == "last":
        return [have[-1]]
    wanted = [int(steps)] if isinstance(steps, int | np.integer) else [int(s) for s in steps]
    missing = [s for s in wanted if s not in have]
    if missing:
        raise PlotError(f"step(s) {missing} not recorded; recorded steps are {_few(have)}")
    return wanted


def _few(values: Sequence[int]) -> str:
    if len(values) <= 8:
        return str(list(values))
    return f"{values[0]}, {values[1]}, ..., {values[-1]} ({len(values)} steps)"


def row_groups(
    frame: pd.DataFrame, layers: Sequence[str], max_rows: int = MAX_ROWS
) -> dict[str, str]:
    """Each layer's row label in a layer x step figure, keeping input-side layers apart.

    Up to `max_rows` layers: one row each. More: the layers of one recorded block share a row
    where that leaves at most `max_rows` rows (layers outside any block keep their own);
    otherwise runs of consecutive layers, in depth order, share a row labelled by the first
    and last of them. A deep plain stack without blocks (60 convolutions in one Sequential)
    thus keeps 60 rows, or consecutive ranges, never one row for the whole container.
    """
    layers = list(layers)
    if len(layers) <= max_rows:
        return {name: name for name in layers}
    blocks = [b.partition("[")[0] for b in fr.stream_layers(frame)]
    by_block = {}
    for name in layers:
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        by_block[name] = block or name
    if 1 < len(set(by_block.values())) <= max_rows:
        return by_block
    size = math.ceil(len(layers) / max_rows)
    groups = {}
    for start in range(0, len(layers), size):
        chunk = layers[start : start + size]
        label = chunk[0] if len(chunk) == 1 else f"{chunk[0]} .. {chunk[-1]}"
        groups.update({name: label for name in chunk})
    return groups


def short_names(names: Sequence[str], width: int = 28) -> list[str]:
    """Layer names cut from the left to `width` characters (the tail says which layer)."""
    return [n if len(n) <= width else "…" + n[-(width - 1) :] for n in names]


def name_ticks(ax: plt.Axes, names: Sequence[str], axis: str = "x", most: int = 30) -> None:
    """Labels positions 0..n-1 of an axis with layer names, at most `most` of them."""
    step = max(1, math.ceil(len(names) / most))
    ticks = list(range(0, len(names), step))
    labels = short_names([names[i] for i in ticks])
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=7)
    else:
        ax.set_yticks(ticks, labels, fontsize=7)


def draw_zeros(ax: plt.Axes, zeros: list[tuple[float, Any]]) -> int:
    """Marks exact zeros (x, colour) on a log y axis at its floor, after the positive values
    are drawn: a log axis cannot show 0, and a silently missing point hides the worst layer.
    Returns how many were marked."""
    if not zeros:
        return 0
    low, high = ax.get_ylim()
    if not ax.lines or not (np.isfinite(low) and low > 0):
        low, high = 1e-12, 1.0
    floor = low / 3
    xs = [x for x, _ in zeros]
    colors = [c for _, c in zeros]
    ax.scatter(xs, [floor] * len(xs), marker="v", c=colors, s=36, zorder=5,
               label=f"exactly 0 ({len(xs)}; drawn at the floor)")  # fmt: skip
    ax.set_ylim(floor / 2, high)
    return len(xs)


def save_png(fig: plt.Figure, path: str | os.PathLike[str], dpi: int = 90) -> None:
    """Writes a figure as PNG and closes it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def steps_palette(steps: Sequence[int]) -> list[Any]:
    """One colour per step, early to late (viridis)."""
    return list(sns.color_palette("viridis", len(steps)))


def first_last(rows: pd.DataFrame) -> list[int]:
    """The first and the last recorded step of `rows` (one where they are the same)."""
    steps = sorted(rows["step"].unique())
    return [int(s) for s in dict.fromkeys([steps[0], steps[-1]])]


def lines_by_step(
    ax: plt.Axes, rows: pd.DataFrame, picks: Sequence[int], layers: Sequence[str], log: bool
) -> list[tuple[float, Any]]:
    """One line per picked step of `rows` (layer, step, value) across `layers`, each layer at
    its position in that list, early steps to late in viridis. With `log`, zeros are left out
    of the lines and returned as (position, colour) for draw_zeros."""
    index = {name: i for i, name in enumerate(layers)}
    zeros: list[tuple[float, Any]] = []
    for step, color in zip(picks, steps_palette(picks), strict=True):
        at = rows[rows["step"] == step]
        x = at["layer"].map(index).to_numpy(dtype=float)
        y = at["value"].to_numpy(dtype=float)
        order = np.argsort(x)
        if log:
            zeros += [(float(i), color) for i in x[y == 0]]
            y = np.where(y > 0, y, np.nan)
        ax.plot(x[order], y[order], marker=".", color=color, label=f"step {step}")
    return zeros
