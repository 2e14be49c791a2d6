"""Pure tensor -> tensor statistics in additive form (float64), and the stats derived from them.

Every function here is stateless. Moments add across calls, micro-batches and ranks: merge
them, then derive norms, means and fractions. Sums of squares are taken in float64 so that
float32 subnormal gradients (about 1e-39 at depth 100) never square to zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# activation moments, one float64 vector per module call
ACT_FIELDS = ("sum", "sumsq", "min", "max", "nonzero", "nonfinite", "saturated")
# activation-gradient moments: samples are indexed by the first dimension
GRAD_FIELDS = ("samples", "sumsq", "sample_norm_sum", "nonfinite_samples")

SATURATION_MARGIN = 0.01  # "saturated": within 1% of a bound's magnitude of that bound


def activation_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a bounded activation module (tanh, sigmoid, ...), else None."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.Tanh | nn.Softsign):
        return -1.0, 1.0
    if isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        return 0.0, 1.0
    return None


def activation_moments(x: torch.Tensor, bounds: tuple[float, float] | None = None) -> torch.Tensor:
    """Additive moments of one tensor, in the order of ACT_FIELDS, as float64 on x's device.

    `nonzero` counts non-finite values too (they are not zero); `saturated` is 0 when no
    bounds are given. No host sync.
    """
    x = x.detach()
    f64 = torch.float64
    total = torch.sum(x, dtype=f64)
    sumsq = torch.linalg.vector_norm(x, dtype=f64).square()
    lo, hi = torch.aminmax(x) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
    nonzero = torch.count_nonzero(x)
    # x * 0 is 0 for finite values and NaN for inf or NaN, and NaN counts as non-zero
    nonfinite = torch.count_nonzero(x * 0)
    if bounds is None:
        saturated = torch.zeros((), dtype=f64, device=x.device)
    else:
        low, high = bounds
        margin = SATURATION_MARGIN * max(abs(low), abs(high))
        saturated = torch.count_nonzero((x <= low + margin) | (x >= high - margin))
    parts = (total, sumsq, lo, hi, nonzero, nonfinite, saturated)
    return torch.stack([p.to(f64) for p in parts])


def merge_activation_moments(moments: np.ndarray) -> np.ndarray:
    """Merges rows of activation moments (calls x ACT_FIELDS) into one row."""
    out = moments.sum(axis=0)
    out[2] = moments[:, 2].min()
    out[3] = moments[:, 3].max()
    return out


def activation_stats(moments: np.ndarray, count: int, bounded: bool = False) -> dict[str, float]:
    """Derives mean, std, rms, zero_frac, saturated_frac, min, max, nonfinite from moments."""
    total, sumsq, lo, hi, nonzero, nonfinite, saturated = (float(v) for v in moments)
    n = max(count, 1)
    mean = total / n
    var = max(sumsq / n - mean * mean, 0.0) if math.isfinite(sumsq) else math.nan
    stats = {
        "mean": mean,
        "std": math.sqrt(var) if math.isfinite(var) else math.nan,
        "rms": math.sqrt(sumsq / n),
        "zero_frac": (count - nonzero) / n,
        "min": lo,
        "max": hi,
        "nonfinite": nonfinite,
    }
    if bounded:
        stats["saturated_frac"] = saturated / n
    return stats


def grad_moments(g: torch.Tensor) -> torch.Tensor:
    """Additive moments of a back-propagated gradient, in the order of GRAD_FIELDS."""
    g = g.detach()
    rows = g.reshape(1, -1) if g.dim() == 0 else g.reshape(g.shape[0], -1)
    sample_norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
    finite = torch.isfinite(sample_norms)
    return torch.stack(
        [
            torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=g.device),
            sample_norms.square().sum(),
            sample_norms.sum(),
            (~finite).sum().to(torch.float64),
        ]
    )


def grad_stats(moments: np.ndarray) -> dict[str, float]:
    """Derives `norm` over the batch and `sample_norm` (mean per-sample norm) from moments."""
    samples, sumsq, sample_norm_sum, nonfinite = (float(v) for v in moments)
    return {
        "norm": math.sqrt(sumsq),
        "sample_norm": sample_norm_sum / max(samples, 1.0),
        "nonfinite": nonfinite,
    }


def foreach_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norms of many tensors in one fused float64 call, stacked into one vector."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))


def foreach_max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Largest absolute value of each tensor, in one fused call (exact in the input dtype)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(torch._foreach_norm(tensors, math.inf)).to(torch.float64)


def count_nonfinite(x: torch.Tensor) -> int:
    """Number of inf or NaN values in x (a host sync: used only where a norm is non-finite)."""
    return int((~torch.isfinite(x)).sum().item())
