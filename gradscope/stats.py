"""Pure tensor -> tensor statistics in additive form, and the stats derived from them.

Every function here is stateless. Moments add across calls, micro-batches and ranks: merge
them, then derive norms, means and fractions. Norms of activations and parameters are
accumulated in float64 (float32 subnormal gradients, about 1e-39 at depth 100, square to
zero in float32). Per-sample gradient norms run in float32 where that is exact to ~1e-7
(rows up to FAST_NUMEL long, results inside SAFE_NORM) and are redone in float64 otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# activation moments of one module call, in the output's float dtype; the norm goes apart, in
# float64
ACT_FIELDS = ("sum", "min", "max", "nonzero")

SATURATION_MARGIN = 0.01  # "saturated": within 1% of a bound's magnitude of that bound
# float32 sums of squares are exact to ~1e-7 relative over rows up to this length (measured
# against float64; the error grows with length), so longer rows go straight to float64.
FAST_NUMEL = 1 << 12
# float32 norms outside this range may hide underflowed or overflowed squares: redo them in
# float64 (1e-18 squared is 1e-36, just above float32's smallest normal number).
SAFE_NORM = (1e-18, 1e18)


def activation_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a bounded activation module (tanh, sigmoid, ...), else None."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.Tanh | nn.Softsign):
        return -1.0, 1.0
    if isinstance(module, nn.Sigmoid | nn.Hardsigmoid):
        return 0.0, 1.0
    return None


def activation_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of one tensor (ACT_FIELDS) and its float64 L2 norm; no host sync.

    The sum is float32's cascade sum (~1e-8 relative). `nonzero` counts inf and NaN as
    non-zero only approximately: redo it where `count_nonfinite` is not 0.
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    # float32 counts are exact below 2**24 elements
    acc = torch.float64 if x.dtype == torch.float64 or x.numel() >= 1 << 24 else x.dtype
    norm = torch.linalg.vector_norm(x, dtype=torch.float64)
    if x.numel():
        lo, hi = torch.aminmax(x)
    else:
        lo = hi = torch.zeros((), dtype=x.dtype, device=x.device)
    # sign().abs() is 1 for non-zeros; far cheaper than count_nonzero on ReLU outputs
    nonzero = x.sign().abs_().sum(dtype=acc)
    return torch.stack([torch.sum(x, dtype=acc), lo.to(acc), hi.to(acc), nonzero]), norm


def saturated_count(x: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """How many values of x lie within 1% of a bound's magnitude of a bound."""
    low, high = bounds
    margin = SATURATION_MARGIN * max(abs(low), abs(high))
    mid, half = (low + high) / 2, (high - low) / 2 - margin
    return (x.detach() - mid).abs_().ge(half).sum()


def exact_norm(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """L2 norm accumulated in float64, as torch.linalg.vector_norm(x.double())."""
    return torch.linalg.vector_norm(x.detach(), dim=dim, dtype=torch.float64)


def needs_exact_norm(norm: float | np.ndarray) -> np.ndarray:
    """Which float32 norms may have lost squares to underflow or overflow (elementwise).

    Zeros are suspect too: a float32 norm of subnormal values is exactly 0.
    """
    values = np.atleast_1d(np.asarray(norm, dtype=np.float64))
    return (values < SAFE_NORM[0]) | ~(values < SAFE_NORM[1])  # ~(<) also catches NaN


def activation_stats(
    total: np.ndarray,
    sumsq: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    nonzero: np.ndarray,
    count: np.ndarray,
    nonfinite: np.ndarray,
) -> dict[str, np.ndarray]:
    """Derives mean, std, rms, zero_frac, min, max, nonfinite from merged moments (arrays)."""
    n = np.maximum(count, 1.0)
    mean = total / n
    with np.errstate(invalid="ignore", over="ignore"):
        var = np.maximum(sumsq / n - mean * mean, 0.0)
        return {
            "mean": mean,
            "std": np.sqrt(var),
            "rms": np.sqrt(sumsq / n),
            "zero_frac": (count - nonzero) / n,
            "min": lo,
            "max": hi,
            "nonfinite": nonfinite.astype(np.float64),
        }


def sample_norms(g: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norms (samples along the first dimension); float32 where exact enough."""
    g = g.detach()
    rows = g.reshape(1, -1) if g.dim() == 0 else g.reshape(g.shape[0], -1)
    acc = torch.float64 if rows.shape[1] > FAST_NUMEL else None
    return torch.linalg.vector_norm(rows, dim=1, dtype=acc)


def grad_stats(
    samples: np.ndarray, sumsq: np.ndarray, sample_norm_sum: np.ndarray, nonfinite: np.ndarray
) -> dict[str, np.ndarray]:
    """Derives `norm` over the batch, `sample_norm` (mean per-sample norm) and `nonfinite`."""
    return {
        "norm": np.sqrt(sumsq),
        "sample_norm": sample_norm_sum / np.maximum(samples, 1.0),
        "nonfinite": nonfinite.astype(np.float64),
    }


def foreach_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norms of many tensors in one fused float64 call, as one float64 vector."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))


def foreach_max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Largest absolute value of each tensor (exact), as one float64 vector."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    nonempty = [t if t.numel() else t.new_zeros(1) for t in tensors]
    return torch.stack(torch._foreach_max(torch._foreach_abs(nonempty))).to(torch.float64)


def count_nonfinite(x: torch.Tensor) -> int:
    """Number of inf or NaN values in x (a host sync: used only where a result is non-finite)."""
    return int((~torch.isfinite(x)).sum().item())
