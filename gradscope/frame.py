"""Derived statistics over a recorder's long-form frame: gradient profiles, decay slopes, ratios.

Pure functions: frames in, frames or numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from gradscope.schema import Kind, Stat


def select(
    frame: pd.DataFrame,
    kind: Kind | str | None = None,
    stat: Stat | str | Iterable[str] | None = None,
    *,
    step: int | None = None,
    layers: Iterable[str] | None = None,
) -> pd.DataFrame:
    """The rows of one kind (and stat, or any of several stats; step; layers).

    Example:
        >>> rows = [(0, "fc.weight", "param_grad", "norm", 2.0), (0, "fc", "activation", "rms", 1.0)]
        >>> f = pd.DataFrame(rows, columns=["step", "layer", "kind", "stat", "value"])
        >>> select(f, Kind.PARAM_GRAD, Stat.NORM)["value"].tolist()
        [2.0]
    """
    keep = np.ones(len(frame), dtype=bool)
    if kind is not None:
        keep &= (frame["kind"] == kind).to_numpy()
    if isinstance(stat, str):
        keep &= (frame["stat"] == stat).to_numpy()
    elif stat is not None:
        keep &= frame["stat"].isin([str(s) for s in stat]).to_numpy()
    if step is not None:
        keep &= (frame["step"] == step).to_numpy()
    if layers is not None:
        keep &= frame["layer"].isin(list(layers)).to_numpy()
    return frame[keep]


def weight_matrices(frame: pd.DataFrame) -> list[str]:
    """Parameter fqns of weight matrices (ndim >= 2), in the model's parameter order."""
    rows = select(frame, Kind.PARAM, Stat.NDIM)
    rows = rows[rows["value"] >= 2]
    return list(dict.fromkeys(rows["layer"]))


def gradient_profile(frame: pd.DataFrame, step: int | None = None) -> pd.DataFrame:
    """Gradient norm of each weight matrix at one step (default: the first recorded step).

    Returns columns `layer, index, norm`, index 0 being the matrix nearest the input.
    """
    layers = weight_matrices(frame)
    grads = select(frame, Kind.PARAM_GRAD, Stat.NORM)
    if step is None:
        step = int(grads["step"].min()) if len(grads) else 0
    at = grads[grads["step"] == step].set_index("layer")["value"]
    present = [name for name in layers if name in at.index]
    return pd.DataFrame(
        {"layer": present, "index": range(len(present)), "norm": [at[n] for n in present]}
    )


def decay_slope(norms: np.ndarray | list[float]) -> float:
    """Decades of gradient norm lost per layer going back toward the input (least squares).

    Positive means vanishing toward the input, negative exploding. Zero or non-finite norms
    are left out of the fit; NaN when fewer than two remain.
    """
    values = np.asarray(norms, dtype=np.float64)
    index = np.arange(len(values), dtype=np.float64)
    keep = np.isfinite(values) & (values > 0)
    if keep.sum() < 2:
        return math.nan
    slope = np.polyfit(index[keep], np.log10(values[keep]), 1)[0]
    return float(slope)


def first_last_ratio(norms: np.ndarray | list[float]) -> float:
    """Gradient norm of the first weight matrix divided by that of the last."""
    values = np.asarray(norms, dtype=np.float64)
    if len(values) == 0 or not values[-1] > 0:
        return math.nan
    return float(values[0] / values[-1])


def flow_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per recorded step: first/last gradient ratio and decay slope over the weight matrices."""
    layers = weight_matrices(frame)
    grads = select(frame, Kind.PARAM_GRAD, Stat.NORM)
    wide = grads[grads["layer"].isin(layers)].pivot_table(
        index="step", columns="layer", values="value", aggfunc="first"
    )
    wide = wide[[name for name in layers if name in wide.columns]]
    rows = [
        {
            "step": int(step),
            "grad_ratio": first_last_ratio(row.to_numpy()),
            "grad_decay": decay_slope(row.to_numpy()),
        }
        for step, row in wide.iterrows()
    ]
    return pd.DataFrame(rows, columns=["step", "grad_ratio", "grad_decay"])


def stream_layers(frame: pd.DataFrame, kind: Kind | str = Kind.ACTIVATION) -> list[str]:
    """The recorded block outputs (the residual stream between blocks), in depth order.

    Blocks are what the recorder selects as such (see ``gradscope.recorder.block_fqns``): its
    `block_index` rows give each one's position. Tuple outputs appear as ``fqn[0]``, ...
    """
    rows = select(frame, kind, Stat.BLOCK_INDEX)
    order = rows.drop_duplicates("layer").sort_values("value", kind="stable")
    return list(order["layer"])
