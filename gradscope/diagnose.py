"""Rules over a recorder frame that return verdicts in words, with the evidence behind them."""

from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import pandas as pd

from gradscope import frame as fr
from gradscope import timeline
from gradscope.schema import Kind, Stat
from gradscope.verdict import SEVERITIES, Verdict
from gradscope.verdict import fmt as _fmt

# Under SGD a layer's step scales with its gradient: 1e-3 means the first layer learns a
# thousand times slower than the last.
VANISHING_RATIO = 1e-3
# The mirror image: the first layer gets steps a thousand times larger than the last.
EXPLODING_RATIO = 1e3
# Below this ratio the first layers are numerically frozen (float32 keeps ~7 digits).
SEVERE_RATIO = 1e-6
# A layer whose outputs are exact zeros this often has mostly dead (ReLU) units.
DEAD_FRAC = 0.9
# Bounded activations this often within 1% of their bounds pass almost no gradient.
SATURATED_FRAC = 0.5
# Karpathy's rule of thumb puts healthy update/weight ratios near 1e-3 per step.
UPDATE_RATIO_LOW = 1e-5
UPDATE_RATIO_HIGH = 1e-1


def _flow_verdicts(frame: pd.DataFrame, step: int) -> list[Verdict]:
    profile = fr.gradient_profile(frame, step)
    if len(profile) < 2:
        return []
    norms = profile["norm"].to_numpy()
    ratio, decay = fr.first_last_ratio(norms), fr.decay_slope(norms)
    first, last = profile["layer"].iloc[0], profile["layer"].iloc[-1]
    evidence = {
        "step": step,
        "first_last_ratio": ratio,
        "decades_per_layer": decay,
        "first_norm": float(norms[0]),
        "last_norm": float(norms[-1]),
        "matrices": len(norms),
    }
    if ratio < VANISHING_RATIO or (norms[0] == 0 and norms[-1] > 0):
        return [
            Verdict(
                "vanishing_gradients",
                "error" if not ratio >= SEVERE_RATIO else "warning",
                f"the first layer's gradient is {_fmt(ratio)} of the last's at step {step} "
                f"({_fmt(decay)} decades lost per layer): vanishing",
                "add residual connections (Pre-LN or RMSNorm blocks), or use an init matched "
                "to the activation (kaiming for ReLU)",
                [first, last],
                evidence,
                VANISHING_RATIO,
            )
        ]
    if ratio > EXPLODING_RATIO:
        return [
            Verdict(
                "exploding_gradients",
                "error",
                f"the first layer's gradient is {_fmt(ratio)} times the last's at step {step} "
                f"({_fmt(-decay)} decades gained per layer): exploding",
                "normalize (Pre-LN), lower the init gain or the learning rate, clip gradients "
                "at norm 1.0",
                [first, last],
                evidence,
                EXPLODING_RATIO,
            )
        ]
    return []


def _activation_verdicts(frame: pd.DataFrame, step: int) -> list[Verdict]:
    acts = fr.select(frame, Kind.ACTIVATION, step=step)
    # units die or saturate in activation functions; a block's output (the stream) is not one
    acts = acts[~acts["layer"].isin(fr.stream_layers(frame))]
    out = []
    for stat, limit, vid, what, suggestion in (
        (
            "zero_frac",
            DEAD_FRAC,
            "dead_units",
            "outputs are exactly zero",
            "lower the learning rate, use kaiming init, or a leaky activation (GELU)",
        ),
        (
            "saturated_frac",
            SATURATED_FRAC,
            "saturated_units",
            "outputs sit at their bounds",
            "normalize inputs to the activation (LayerNorm), use xavier init, or use ReLU/GELU",
        ),
    ):
        rows = acts[(acts["stat"] == stat) & (acts["value"] > limit)]
        if len(rows):
            worst = rows.loc[rows["value"].idxmax()]
            out.append(
                Verdict(
                    vid,
                    "warning",
                    f"{len(rows)} layer(s) where over {limit:.0%} of {what} at step {step} "
                    f"(worst {worst['layer']}: {worst['value']:.1%})",
                    suggestion,
                    list(rows["layer"]),
                    {"step": step, stat: dict(zip(rows["layer"], rows["value"], strict=True))},
                    limit,
                )
            )
    return out


def _update_verdicts(frame: pd.DataFrame, step: int) -> list[Verdict]:
    matrices = set(fr.weight_matrices(frame))
    rows = fr.select(frame, Kind.UPDATE, Stat.RATIO, step=step, layers=matrices)
    values = rows["value"].to_numpy()
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return []
    median = float(np.median(values))
    evidence = {
        "step": step,
        "median_update_ratio": median,
        "min": float(values.min()),
        "max": float(values.max()),
    }
    if median < UPDATE_RATIO_LOW:
        return [
            Verdict(
                "update_too_small",
                "warning",
                (
                    f"the median update is 0 at step {step}: most layers' weights did not move "
                    "at all (no gradient, or steps too small to change a float32 weight)"
                    if median == 0
                    else f"the median update is {_fmt(median)} of the weight norm at step {step}"
                ),
                "raise the learning rate (or check that gradients are not vanishing)",
                list(rows["layer"]),
                evidence,
                UPDATE_RATIO_LOW,
            )
        ]
    if median > UPDATE_RATIO_HIGH:
        return [
            Verdict(
                "update_too_large",
                "warning",
                f"the median update is {_fmt(median)} of the weight norm at step {step}",
                "lower the learning rate or clip gradients",
                list(rows["layer"]),
                evidence,
                UPDATE_RATIO_HIGH,
            )
        ]
    return []


def _nonfinite_verdicts(frame: pd.DataFrame, step: int) -> list[Verdict]:
    frame = frame[frame["step"] <= step]
    origins = fr.select(frame, Kind.NONFINITE_ORIGIN)
    bad = fr.select(frame, Kind.PARAM_GRAD, Stat.NONFINITE)
    bad = bad[bad["value"] > 0]
    if not len(origins) and not len(bad):
        return []
    steps = sorted(set(origins["step"]) | set(bad["step"]))
    first = steps[0]
    at = origins[origins["step"] == first]
    where = {row.stat: row.layer for row in at.itertuples()}
    parts = [f"{phase} in {where[phase]}" for phase in ("forward", "backward") if phase in where]
    bad_first = bad[bad["step"] == first]
    if not parts and len(bad_first):
        parts = [f"in the gradient of {bad_first['layer'].iloc[0]}"]
    return [
        Verdict(
            "nonfinite_values",
            "error",
            f"non-finite values from step {first} on: first {', '.join(parts)}",
            "lower the learning rate, clip gradients at norm 1.0, or check the inputs and the loss",
            list(where.values()) or list(bad_first["layer"]),
            {
                "first_step": first,
                "steps": len(steps),
                "origin": where,
                "nonfinite_param_grads": int(len(bad)),
            },
            0.0,
        )
    ]


def diagnose(frame: pd.DataFrame, step: int | None = None) -> list[Verdict]:
    """Verdicts over a recorder frame: by default over the whole recording, with `step` at
    that one step.

    Over the whole recording: the single-step rules (gradient flow, dead or saturated units,
    update size) at the last step, non-finite values over all steps, and the rules over time
    (gradient and loss spikes, gradient growth, frozen layers, dead units accumulating, a
    loss that does not decrease; see gradscope.timeline). Each verdict says over which steps
    it holds (`first_step`, `last_step`). Sorted by severity, then by first step. A `healthy`
    verdict when no rule fires.

    Example:
        >>> [v.id for v in diagnose(pd.DataFrame(columns=["step", "layer", "kind", "stat", "value"]))]
        ['healthy']
    """
    if len(frame) == 0:
        return [Verdict("healthy", "ok", "nothing was recorded, so nothing is wrong", "")]
    at = int(frame["step"].max()) if step is None else step
    verdicts = (
        _nonfinite_verdicts(frame, at)
        + _flow_verdicts(frame, at)
        + _activation_verdicts(frame, at)
        + _update_verdicts(frame, at)
    )
    if step is None:
        verdicts = [_over_run(v, frame, at) for v in verdicts]
        verdicts += timeline.spike_verdicts(frame) + timeline.trend_verdicts(
            frame, UPDATE_RATIO_LOW
        )
    else:
        verdicts = [
            replace(v, first_step=v.evidence.get("first_step", at), last_step=at) for v in verdicts
        ]
    if not verdicts:
        profile = fr.gradient_profile(frame, at)
        norms = profile["norm"].to_numpy()
        evidence = {
            "step": at,
            "first_last_ratio": fr.first_last_ratio(norms),
            "decades_per_layer": fr.decay_slope(norms),
        }
        first = int(frame["step"].min()) if step is None else at
        span = f"steps {first} to {at}" if first != at else f"step {at}"
        verdicts = [
            Verdict(
                "healthy",
                "ok",
                f"gradients flow (first/last ratio {_fmt(evidence['first_last_ratio'])}), "
                f"no dead or saturated layers, no non-finite values, no spikes or trends over "
                f"{span}"
                if step is None
                else f"gradients flow (first/last ratio {_fmt(evidence['first_last_ratio'])}), "
                f"no dead or saturated layers, no non-finite values at step {at}",
                "",
                [],
                evidence,
                None,
                first,
                at,
            )
        ]
    return sorted(verdicts, key=lambda v: (-SEVERITIES.index(v.severity), v.first_step or 0, v.id))


def _over_run(verdict: Verdict, frame: pd.DataFrame, last: int) -> Verdict:
    """A last-step verdict with the steps it holds over: for gradient flow, back from the
    last step for as long as the ratio stayed past the threshold."""
    first = verdict.evidence.get("first_step", last)
    if verdict.id in ("vanishing_gradients", "exploding_gradients"):
        flow = fr.flow_summary(frame).set_index("step")["grad_ratio"]
        holds = (
            flow < VANISHING_RATIO
            if verdict.id == "vanishing_gradients"
            else flow > EXPLODING_RATIO
        )
        since = holds[::-1].cumprod()[::-1]  # true from the last break on
        steps = since.index[since.to_numpy().astype(bool)]
        first = int(steps[0]) if len(steps) else last
    return replace(verdict, first_step=int(first), last_step=last)


class OnlineDiagnosis:
    """The diagnosis while training: over the last `window` recorded steps, each new warning
    or error id reported once (gradscope.Recorder's on_verdict)."""

    def __init__(self, window: int = 32) -> None:
        self._steps: collections.deque[pd.DataFrame] = collections.deque(maxlen=window)
        self._announced: set[str] = set()

    def update(self, step_frame: pd.DataFrame) -> list[Verdict]:
        """Adds one recorded step's rows; returns the verdicts not reported before."""
        self._steps.append(step_frame)
        new = []
        for verdict in diagnose(pd.concat(self._steps, ignore_index=True)):
            if verdict.severity in ("warning", "error") and verdict.id not in self._announced:
                self._announced.add(verdict.id)
                new.append(verdict)
        return new
