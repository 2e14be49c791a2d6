"""What the optimizer does not touch: `no_updates` (nothing moves although gradients are
nonzero: a learning rate of 0), `not_in_optimizer` (some parameters with gradients never
move: left out of the optimizer) and `no_gradient` (the first modules get no gradient:
frozen, or the graph is detached after them; info, often intended)."""

from __future__ import annotations

import pandas as pd

from gradscope.analysis.view import RunView, module_of
from gradscope.schema import Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, plural

# A parameter whose update is exactly 0 while its gradient is not, on this share of the
# recorded steps (before anything went non-finite), is not being stepped.
STILL_SHARE = 0.9
MIN_STEPS = 3
# float32 keeps ~7 digits: a step below this share of the weights may round to no change
FLOAT32_RESOLUTION = 1e-6


def _still(view: RunView) -> pd.Series:
    updates = view.finite_steps(view.table(Kind.UPDATE, Stat.NORM))
    grads = view.finite_steps(view.grad)
    if updates.empty or len(updates) < MIN_STEPS:
        return pd.Series(dtype=float)
    cols = [c for c in updates.columns if c in grads.columns]
    still = (updates[cols] == 0) & (grads[cols] > 0)
    # a step too small for float32 to register is not "not stepped": the gradient times the
    # step size of the parameters that do move, against the parameter's norm
    sizes = view.finite_steps(view.table(Kind.UPDATE, Stat.STEP_SIZE))
    norms = view.finite_steps(view.table(Kind.PARAM, Stat.NORM))
    if not sizes.empty and not norms.empty:
        rate = sizes[cols].where(sizes[cols] > 0).median(axis=1)
        expected = grads[cols].mul(rate, axis=0) / norms.reindex(columns=cols)
        still &= ~(expected < FLOAT32_RESOLUTION)

    has_grad = (grads[cols] > 0).sum()
    share = still.sum() / has_grad.where(has_grad > 0)
    return share.dropna()


def check(view: RunView) -> list[Verdict]:
    if len(view.steps) == 0:
        return []
    first, last = int(view.steps[0]), int(view.steps[-1])
    out: list[Verdict] = []
    share = _still(view)
    still = share[share >= STILL_SHARE]
    if len(share) and len(still) == len(share):
        out.append(
            Verdict(
                VerdictId.NO_UPDATES,
                Severity.ERROR,
                f"no parameter moved on {_pct(float(still.min()))} of the steps although "
                "the gradients are nonzero: the learning rate is 0, or the optimizer holds "
                "other tensors than the model's",
                "check the learning rate (and the schedule's factor) and that the optimizer "
                "was built from model.parameters()",
                [],
                {"parameters": len(share)},
                STILL_SHARE,
                first,
                last,
            )
        )
    elif len(still):
        modules = list(dict.fromkeys(module_of(p) for p in still.index))
        out.append(
            Verdict(
                VerdictId.NOT_IN_OPTIMIZER,
                Severity.WARNING,
                f"{plural(len(still), 'parameter')} of {', '.join(modules[:3])}"
                + (f" and {plural(len(modules) - 3, 'other module')}" if len(modules) > 3 else "")
                + " get gradients but never move: they are not in the optimizer",
                "add them to the optimizer (build it from model.parameters(), or add a "
                "param group); freeze them with requires_grad_(False) if that was the intent",
                modules,
                {"parameters": list(still.index)},
                STILL_SHARE,
                first,
                last,
            )
        )
    out += _no_gradient(view, first, last)
    return out


def _pct(x: float) -> str:
    return "every one" if x >= 1 else f"{x:.0%}"


def _no_gradient(view: RunView, first: int, last: int) -> list[Verdict]:
    acts = view.table(Kind.ACTIVATION, Stat.RMS)
    grads = view.table(Kind.ACTIVATION_GRAD, Stat.NORM)
    if acts.empty or grads.empty:
        return []
    order = list(acts.columns)
    with_grad = set(grads.columns)
    lead = []
    for module in order:
        if module in with_grad:
            break
        lead.append(module)
    if not lead or len(lead) == len(order):
        return []
    return [
        Verdict(
            VerdictId.NO_GRADIENT,
            Severity.INFO,
            f"no gradient reaches the first {plural(len(lead), 'module')} ({', '.join(lead[:4])}"
            + (", ..." if len(lead) > 4 else "")
            + "): their parameters are frozen (requires_grad=False) or the graph is detached "
            "after them",
            "fine for a frozen backbone; otherwise set requires_grad_(True) and remove the "
            ".detach() (or torch.no_grad()) after them",
            lead,
            {"modules": lead},
            None,
            first,
            last,
        )
    ]
