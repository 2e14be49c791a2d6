"""Divergence and spikes, caught where gradient or update norms first leave their baseline
(before the loss explodes): `lr_too_high` (updates as large as the weights; a jump of the
step size, i.e. of the learning rate; large steps on a loss that does not fall) and
`gradient_spike` (one step's gradient orders of magnitude above its baseline at an
unchanged step size: an outlier or corrupted batch)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradscope.analysis.view import RunView, trailing_median
from gradscope.schema import Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, fmt

# Updates this large a share of the weights (median over weight matrices) rewrite the
# network each step. Healthy runs of the tuning half peak at 0.11 (SGD with BatchNorm).
UPDATE_RATIO_HIGH = 0.3
# A gradient (total norm) or an update ratio this many times its trailing median has left
# its baseline.
GRAD_JUMP = 10.0
UPDATE_JUMP = 10.0
# ... to at least this share of the weights (below it, ratios of a vanishing stack, 1e-10,
# jump by 10x on rounding alone).
UPDATE_JUMP_FLOOR = 0.01
# The step size (update / gradient: the effective learning rate) this many times its
# trailing median: the learning rate itself changed (schedules change it by far less a step).
STEP_SIZE_JUMP = 3.0
# The first module's output rms this many times its trailing median at the spike: the batch
# itself is unlike the others: out of its baseline by an order of magnitude, as for the
# gradient (weights grown by a high learning rate move it by a few times).
INPUT_JUMP = GRAD_JUMP
RECOVERY_STEPS = 5
BASELINE_WINDOW = 20
MIN_HISTORY = 3
# Large but not extreme steps count when the loss does not fall either: the peak update
# ratio over the first 10 steps (10x the healthy 0.01), and the loss's last-quarter median against its first.
UPDATE_RATIO_STUCK = 0.1
LOSS_STUCK = 0.9


def _jump(series: pd.Series, step: int) -> float:
    base = trailing_median(series, BASELINE_WINDOW, MIN_HISTORY)
    if step not in base.index:
        return math.nan
    b, v = float(base.loc[step]), float(series.loc[step])
    if not math.isfinite(b) or b <= 0:
        return math.nan
    return v / b if math.isfinite(v) else math.inf


def first_departure(view: RunView) -> tuple[int, str] | None:
    """The first step where the update ratio passes UPDATE_RATIO_HIGH or leaves its baseline
    by UPDATE_JUMP, or the total gradient norm leaves its baseline by GRAD_JUMP, and which
    did."""
    ratio = view.update_ratio
    grad = view.total_grad
    steps = sorted(set(ratio.index) | set(grad.index))
    base = trailing_median(grad, BASELINE_WINDOW, MIN_HISTORY) if len(grad) else grad
    r_base = trailing_median(ratio, BASELINE_WINDOW, MIN_HISTORY) if len(ratio) else ratio
    for step in steps:
        r = float(ratio.get(step, math.nan))
        rb = float(r_base.get(step, math.nan)) if len(r_base) else math.nan
        jumped = rb > 0 and r >= UPDATE_JUMP * rb and r >= UPDATE_JUMP_FLOOR
        if math.isfinite(r) and (r >= UPDATE_RATIO_HIGH or jumped):
            return int(step), "update"
        if step in base.index and math.isfinite(float(base.loc[step])):
            g = float(grad.loc[step])
            # (an inf/NaN gradient is the non-finite rule's: it finds the module that made it)
            if math.isfinite(g) and g >= GRAD_JUMP * float(base.loc[step]):
                return int(step), "gradient"
    return None


def check(view: RunView) -> list[Verdict]:
    if len(view.steps) == 0:
        return []
    last = int(view.steps[-1])
    hit = first_departure(view)
    if hit is None:
        return _stuck(view, last)
    step, what = hit
    grad_jump = _jump(view.total_grad, step) if len(view.total_grad) else math.nan
    size_jump = _jump(view.step_size, step) if len(view.step_size) else math.nan
    ratio = float(view.update_ratio.get(step, math.nan))
    evidence = {
        "step": step,
        "update_ratio": ratio,
        "gradient_jump": grad_jump,
        "step_size_jump": size_jump,
        "went_nonfinite_at": view.first_nonfinite,
    }
    if grad_jump >= GRAD_JUMP and not (size_jump >= STEP_SIZE_JUMP):
        after = view.total_grad[view.total_grad.index > step].head(3)
        acts = view.table(Kind.ACTIVATION, Stat.RMS)
        input_jump = _jump(acts[acts.columns[0]], step) if not acts.empty else math.nan
        evidence |= {"input_jump": input_jump}
        if not input_jump >= INPUT_JUMP and _recovered(view, step):
            return [
                Verdict(
                    VerdictId.GRADIENT_SPIKE,
                    Severity.INFO,
                    f"at step {step} the gradient jumped to {fmt(grad_jump)} times its recent "
                    "median on a batch like the others, and the run recovered (its loss fell "
                    "back below where it was before)",
                    "a transient: clip gradients at norm 1.0 if it recurs",
                    [],
                    evidence | {"next_gradients": [float(x) for x in after]},
                    GRAD_JUMP,
                    step,
                    last,
                )
            ]
        batch = (
            f" (its first layer's outputs {fmt(input_jump)}x their recent median)"
            if input_jump >= INPUT_JUMP
            else ""
        )
        return [
            Verdict(
                VerdictId.GRADIENT_SPIKE,
                Severity.WARNING,
                f"at step {step} the gradient jumped to {fmt(grad_jump)} times its recent "
                "median while the step size stayed the same: one batch unlike the others"
                + batch
                + (
                    f" (the run went non-finite at step {view.first_nonfinite})"
                    if view.first_nonfinite is not None
                    else ""
                ),
                "look at the batch of that step (a corrupted or outlier input); clip "
                "gradients at norm 1.0 so one batch cannot wreck the weights",
                [],
                evidence | {"next_gradients": [float(x) for x in after]},
                GRAD_JUMP,
                step,
                last,
            )
        ]
    if size_jump >= STEP_SIZE_JUMP:
        how = (
            f"the step size (update / gradient) jumped {fmt(size_jump)}x at step {step}: "
            "the learning rate went up"
        )
    elif what == "update" and ratio < UPDATE_RATIO_HIGH:
        how = f"updates jumped to {fmt(ratio)} of the weights' norm at step {step}"
    elif what == "update":
        how = (
            f"updates are {fmt(ratio)} of the weights' norm at step {step} "
            f"(healthy training stays near 0.001 to 0.01)"
        )
    else:
        how = f"the gradient norm left its baseline ({fmt(grad_jump)}x) at step {step}"
    diverged = view.first_nonfinite is not None
    loss = view.loss.dropna()
    blew_up = diverged or (len(loss) > 2 and not np.all(np.isfinite(loss)))
    return [
        Verdict(
            VerdictId.LR_TOO_HIGH,
            Severity.ERROR if blew_up or ratio >= 1 else Severity.WARNING,
            how + (f"; the run went non-finite at step {view.first_nonfinite}" if diverged else ""),
            "lower the learning rate (x0.1), warm it up over the first steps, and clip "
            "gradients at norm 1.0",
            [],
            evidence,
            UPDATE_RATIO_HIGH,
            step,
            last,
        )
    ]


def _recovered(view: RunView, step: int) -> bool:
    """Finite throughout, and the loss over the last RECOVERY_STEPS steps below its median
    over the RECOVERY_STEPS before `step`."""
    loss = view.loss
    if view.first_nonfinite is not None or len(loss) == 0:
        return False
    before = loss[loss.index < step].tail(RECOVERY_STEPS)
    end = loss[loss.index > step].tail(RECOVERY_STEPS)
    if len(before) == 0 or len(end) < RECOVERY_STEPS:
        return False
    return float(end.median()) < float(before.median())


def _stuck(view: RunView, last: int) -> list[Verdict]:
    """Large steps with a loss that does not fall: too high to settle (a Post-LN stack
    without warm-up)."""
    ratio = view.update_ratio.dropna()
    loss = view.loss.dropna()
    if len(ratio) < 8 or len(loss) < 8:
        return []
    # the peak, not the median: Adam's ratio falls as the weights grow, after the damage
    # (units killed, a Post-LN stack stuck) is done in the first steps
    early = float(ratio.iloc[:10].max())
    quarter = max(2, len(loss) // 4)
    head, tail = float(loss.iloc[:quarter].median()), float(loss.iloc[-quarter:].median())
    if early >= UPDATE_RATIO_STUCK and head > 0 and tail >= LOSS_STUCK * head:
        return [
            Verdict(
                VerdictId.LR_TOO_HIGH,
                Severity.WARNING,
                f"updates reach {fmt(early)} of the weights' norm in the first steps and the "
                f"loss does not fall ({fmt(head)} -> {fmt(tail)})",
                "lower the learning rate or warm it up (Post-LN transformers need warm-up)",
                [],
                {
                    "early_update_ratio": early,
                    "loss_first_quarter": head,
                    "loss_last_quarter": tail,
                },
                UPDATE_RATIO_STUCK,
                int(ratio.index[0]),
                last,
            )
        ]
    return []
