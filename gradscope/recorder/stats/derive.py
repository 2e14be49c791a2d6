"""The statistics the frame shows, derived in one place from merged per-call fields (mean, std,
rms, fractions, norms, ratios): pure numpy over (steps, layers) arrays."""

from __future__ import annotations

import numpy as np

from gradscope.schema import Stat


def activation_stats(merged: dict[str, np.ndarray], count: np.ndarray) -> dict[str, np.ndarray]:
    """Each activation statistic from an output's merged fields.OUTPUT and its value count."""
    total, sumsq = merged["sum"], merged["sumsq"]
    lo, hi = merged["min"].copy(), merged["max"].copy()
    no_value = lo > hi  # a layer with no value but NaN (counted in nonfinite)
    lo[no_value] = hi[no_value] = np.nan
    lo[count == 0] = hi[count == 0] = 0.0  # an empty output: +0.0 whatever path took its extremes
    n = np.maximum(count, 1.0)
    mean = total / n
    with np.errstate(invalid="ignore", over="ignore"):
        var = np.maximum(sumsq / n - mean * mean, 0.0)
        return {
            Stat.MEAN: mean,
            Stat.STD: np.sqrt(var),
            Stat.RMS: np.sqrt(sumsq / n),
            Stat.ZERO_FRAC: (count - merged["nonzero"]) / n,
            Stat.MIN: lo,
            Stat.MAX: hi,
            Stat.NONFINITE: merged["nonfinite"].astype(np.float64),
            Stat.DEAD_UNITS: merged["dead_units"],
            Stat.UNITS: merged["units"],
        }


def saturated_frac(saturated: np.ndarray, count: np.ndarray) -> np.ndarray:
    return saturated / np.maximum(count, 1.0)


def grad_stats(merged: dict[str, np.ndarray], samples: np.ndarray) -> dict[str, np.ndarray]:
    """`norm` over the batch, `sample_norm` (mean per-sample norm) and `nonfinite` from an
    output gradient's merged fields.GRAD and its sample count."""
    return {
        Stat.NORM: np.sqrt(merged["sumsq"]),
        Stat.SAMPLE_NORM: merged["sample_norm_sum"] / np.maximum(samples, 1.0),
        Stat.NONFINITE: merged["nonfinite_samples"].astype(np.float64),
    }


def update_ratio(update_norm: np.ndarray, param_norm: np.ndarray) -> np.ndarray:
    """Update norm / parameter norm (NaN where the parameter is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(param_norm > 0, update_norm / param_norm, np.nan)


def update_geometry(
    update_norm: np.ndarray, grad_norm: np.ndarray, dot: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The cosine between the update and the negative gradient, and update norm / gradient
    norm (the effective step size); NaN where a norm is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(update_norm * grad_norm > 0, -dot / (update_norm * grad_norm), np.nan)
        step = np.where(grad_norm > 0, update_norm / grad_norm, np.nan)
    return np.clip(cos, -1.0, 1.0), step


def total_norm(grad_norm: np.ndarray) -> np.ndarray:
    """The L2 norm over all parameters of each step, (steps, 1)."""
    return np.sqrt(np.square(grad_norm).sum(axis=1, keepdims=True))
