"""Figures of one recording's module outputs: an activation statistic per module (output rms,
dead units, exact zeros, saturation), named on the x axis, and the residual stream per block
on its own axis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from gradscope import frame as fr
from gradscope.analysis.rules.units import DEAD_ELEMENT_FRAC, DEAD_FRAC
from gradscope.plot.common import (
    PlotError,
    as_frame,
    draw_zeros,
    first_last,
    lines_by_step,
    name_ticks,
    need,
    new_axes,
    pick_steps,
)
from gradscope.schema import COLUMNS, Kind, Stat

# activation functions whose exact zeros mean units that output nothing; other modules
# (Identity shortcuts, pooling, dropout, convolutions after a ReLU) only pass zeros on
ZEROING = {"ReLU", "ReLU6", "RReLU", "Hardshrink", "Softshrink", "Threshold"}
BOUNDED = {"Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Softsign", "LogSigmoid"}


def _activation_layers(frame: pd.DataFrame, stat: str, types: Mapping[str, str] | None) -> list:
    """The modules whose `stat` means what the figure says: for dead units and zero
    fractions, the modules that make zeros (ReLU-like functions), for saturation, bounded
    functions."""
    acts = fr.select(frame, Kind.ACTIVATION)
    stream = set(fr.stream_layers(frame))
    order = [n for n in dict.fromkeys(acts["layer"]) if n not in stream]
    if stat == Stat.RMS:
        return order
    have = set(acts.loc[acts["stat"] == stat, "layer"])
    if types:
        wanted = BOUNDED if stat == Stat.SATURATED_FRAC else ZEROING
        return [n for n in order if n in have and types.get(n) in wanted]
    if stat == Stat.SATURATED_FRAC:
        return [n for n in order if n in have]  # recorded only for bounded activations
    # without module types: the modules that make zeros rather than pass them on, i.e. whose
    # zero fraction exceeds the previous module's by 5 points at the first recorded step
    first = acts[(acts["stat"] == Stat.ZERO_FRAC) & (acts["step"] == acts["step"].min())]
    zero = first.set_index("layer")["value"]
    keep, before = [], 0.0
    for name in order:
        value = float(zero.get(name, np.nan))
        if np.isfinite(value):
            if value > before + 0.05 and name in have:
                keep.append(name)
            before = value
    return keep


def activations(
    data: Any,
    stat: Stat | str = Stat.RMS,
    steps: int | Sequence[int] | str | None = None,
    *,
    types: Mapping[str, str] | None = None,
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """An activation statistic per module, named on the x axis, at chosen steps.

    `stat` is "rms" (every module but the residual stream), "dead_units" (ReLU-like
    functions only: the fraction of units, features or channels, that are 0 for every
    sample of the batch, `dead_units / units`; the dotted line is the dead-units verdict's
    limit), "zero_frac" (the same modules' exact-zero elements: a healthy ReLU's ~0.5 is
    sparsity, not death) or "saturated_frac" (bounded functions only). `types`
    maps module fqns to class names (a run's ``info["model"]["types"]``); without it, the
    modules that pass zeros on (Identity, pooling, dropout) are told apart by their zero
    fraction not exceeding the module before them.

    Example:
        >>> import gradscope.plot as gp
        >>> from gradscope.lab.models import recorded_example
        >>> rec = recorded_example()  # a small model, watched
        >>> gp.activations(rec, "dead_units").get_ylabel()
        'fraction of units dead'
    """
    frame = as_frame(data)
    info = getattr(data, "info", None)  # a Run's run.json (a DataFrame's .info is a method)
    if types is None and isinstance(info, dict):
        types = info.get("model", {}).get("types")
    if types is None and hasattr(data, "model_summary"):
        types = data.model_summary.get("types")
    stat = str(stat)
    names = _activation_layers(frame, stat, types)
    rows = need(
        _values(frame, stat, names),
        {"rms": "activation rms", "zero_frac": "ReLU-like activation",
         "dead_units": "dead units of a ReLU-like activation",
         "saturated_frac": "bounded activation (tanh, sigmoid, ...)"}.get(stat, stat),
    )  # fmt: skip
    picks = pick_steps(rows["step"], steps if steps is not None else first_last(rows))
    ax = new_axes(ax, (9, 4))
    zeros = lines_by_step(ax, rows, picks, names, log=stat == Stat.RMS)
    if stat == Stat.RMS:
        ax.set_yscale("log")
        draw_zeros(ax, zeros)
        ax.set(title="Output rms per module (forward order)", ylabel="rms (log scale)")
    else:
        ax.set_ylim(-0.02, 1.02)
        if stat == Stat.DEAD_UNITS:
            ax.axhline(DEAD_FRAC, color="grey", ls=":", lw=1,
                       label=f"verdict above {DEAD_FRAC:.0%}")  # fmt: skip
            ax.set(title="Dead units: zero for every sample of the batch",
                   ylabel="fraction of units dead")  # fmt: skip
        elif stat == Stat.ZERO_FRAC:
            if not len(fr.select(frame, Kind.ACTIVATION, Stat.DEAD_UNITS)):
                # a recording from before the per-unit statistic: the rule judges this
                ax.axhline(DEAD_ELEMENT_FRAC, color="grey", ls=":", lw=1,
                           label=f"dead above {DEAD_ELEMENT_FRAC:.0%}")  # fmt: skip
            ax.set(title="Zeros (elements) of ReLU-like outputs (~0.5 is normal)",
                   ylabel="fraction of elements exactly 0")  # fmt: skip
        else:
            ax.set(title="Saturated outputs of bounded activations",
                   ylabel="fraction of outputs at a bound")  # fmt: skip
    name_ticks(ax, names)
    ax.set_xlabel("module (input side at left)")
    ax.legend(fontsize=8)
    return ax


def _values(frame: pd.DataFrame, stat: str, names: list) -> pd.DataFrame:
    """The rows of `stat` for `names`; for dead units, the fraction `dead_units / units`."""
    if stat != Stat.DEAD_UNITS:
        return fr.select(frame, Kind.ACTIVATION, stat, layers=names)
    dead = fr.select(frame, Kind.ACTIVATION, Stat.DEAD_UNITS, layers=names)
    units = fr.select(frame, Kind.ACTIVATION, Stat.UNITS, layers=names)
    both = dead.merge(units[["step", "layer", "value"]], on=["step", "layer"], suffixes=("", "_n"))
    return both.assign(value=both["value"] / both["value_n"].where(both["value_n"] > 0))[
        list(COLUMNS)
    ]


def residual_stream(
    data: Any, steps: int | Sequence[int] | str | None = None, *, ax: plt.Axes | None = None
) -> plt.Axes:
    """The residual stream's rms at each block's output (blocks as the recorder found them),
    one line per step, on its own block axis.

    Example:
        >>> import gradscope.plot as gp
        >>> from gradscope.lab.models import recorded_example
        >>> rec = recorded_example("preln")  # a small model, watched
        >>> gp.residual_stream(rec).get_xlabel()
        'block (input side at left)'
    """
    frame = as_frame(data)
    stream = fr.stream_layers(frame)
    if len(stream) < 2:
        raise PlotError("fewer than two residual blocks recorded: no stream to follow")
    rows = need(fr.select(frame, Kind.ACTIVATION, Stat.RMS, layers=stream), "stream rms")
    picks = pick_steps(rows["step"], steps if steps is not None else first_last(rows))
    ax = new_axes(ax, (8, 3.5))
    lines_by_step(ax, rows, picks, stream, log=True)  # (a zero rms is left out, unmarked)
    ax.set_yscale("log")
    name_ticks(ax, stream)
    ax.set(title="Residual stream rms per block", xlabel="block (input side at left)",
           ylabel="rms (log scale)")  # fmt: skip
    ax.legend(fontsize=8)
    return ax
