"""Where the first inf/NaN was made: the module whose forward made it from finite inputs, or
the module whose backward made it from a finite output gradient."""

from __future__ import annotations

import pandas as pd

from gradscope import frame as fr
from gradscope.analysis.view import RunView, module_of
from gradscope.schema import Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, plural

FORWARD_ADVICE = (
    "look in its forward for an operation undefined on its inputs (log or sqrt of a negative, "
    "a division by zero, exp overflowing): clamp its input or add an epsilon"
)
BACKWARD_ADVICE = (
    "its forward was finite but an operation in it has an infinite slope where it was "
    "evaluated (sqrt or a norm at 0, log at 0, a division by a value that is 0): add an "
    "epsilon inside (sqrt(x + 1e-12)), or clamp; lowering the learning rate will not fix it"
)


def _bad(table: pd.DataFrame, step: int) -> list[str]:
    if table.empty or step not in table.index:
        return []
    row = table.loc[step].fillna(0)
    return [str(c) for c in row.index[row.to_numpy() > 0]]


def backward_origin(view: RunView, step: int) -> str | None:
    """The module whose backward made the first non-finite gradient at `step`: its output
    gradient finite and either one of its parameters' gradients non-finite, or the module
    before it (in forward order) with a non-finite output gradient."""
    act_grad = view.table(Kind.ACTIVATION_GRAD, Stat.NONFINITE)
    if act_grad.empty or step not in act_grad.index:
        return None
    order = [c for c in view.table(Kind.ACTIVATION, Stat.RMS).columns if c in act_grad.columns]
    order = order or list(act_grad.columns)
    bad = set(_bad(act_grad, step))
    bad_params = _bad(view.table(Kind.PARAM_GRAD, Stat.NONFINITE), step)
    # a parameter's gradient went bad while its module's output gradient stayed finite
    for param in bad_params:
        module = module_of(param)
        if module in order and module not in bad:
            return module
    if not bad:
        return None
    last_bad = max(order.index(m) for m in bad if m in order) if bad & set(order) else None
    if last_bad is None or last_bad + 1 >= len(order):
        return None
    return order[last_bad + 1]


def unrecorded_wrappers(view: RunView, where: str) -> tuple[str | None, list[str]]:
    """The recorded module called just before `where` and those of its enclosing modules
    whose outputs are not recorded and that do not enclose `where` (innermost first): their
    forwards went on after it returned and before `where` ran, so a value made there reaches
    `where` unseen (a wrapper module's own code)."""
    order = [str(c) for c in view.table(Kind.ACTIVATION, Stat.RMS).columns]
    if where not in order or order.index(where) == 0:
        return None, []
    prev = order[order.index(where) - 1]
    parts = prev.split(".")
    enclosing = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]
    recorded = set(order)
    return prev, [
        a for a in enclosing if a not in recorded and not (where == a or where.startswith(a + "."))
    ]


def check(view: RunView) -> list[Verdict]:
    """`nonfinite_forward`, `nonfinite_backward` or `nonfinite_values` at the first step with
    an inf/NaN."""
    t0 = view.first_nonfinite
    if t0 is None:
        return []
    last = int(view.steps[-1])
    acts = view.table(Kind.ACTIVATION, Stat.NONFINITE)
    forward = _bad(acts, t0)
    origins = fr.select(view.frame, Kind.NONFINITE_ORIGIN, step=t0)
    recorded = {row.stat: row.layer for row in origins.itertuples()}
    evidence = {"first_step": t0, "recorder_origin": recorded}
    if forward:
        where = str(recorded.get(Stat.FORWARD, forward[0]))
        prev, wrappers = unrecorded_wrappers(view, where)
        if wrappers:
            return [
                Verdict(
                    VerdictId.NONFINITE_FORWARD,
                    Severity.ERROR,
                    f"inf/NaN appeared at step {t0} after {prev}'s output (finite) and before "
                    f"{where}'s: {wrappers[0]}'s forward ran in between (its output is not "
                    f"recorded), so look there first, then in {where}'s forward",
                    FORWARD_ADVICE,
                    [wrappers[0], where],
                    evidence | {"modules": forward[:10], "after": prev, "unrecorded": wrappers},
                    0.0,
                    t0,
                    last,
                )
            ]
        return [
            Verdict(
                VerdictId.NONFINITE_FORWARD,
                Severity.ERROR,
                f"{where}'s forward made inf/NaN at step {t0} from finite inputs "
                f"({plural(len(forward), 'module')} non-finite after it)",
                FORWARD_ADVICE,
                [where],
                evidence | {"modules": forward[:10]},
                0.0,
                t0,
                last,
            )
        ]
    origin = backward_origin(view, t0)
    if origin is not None:
        return [
            Verdict(
                VerdictId.NONFINITE_BACKWARD,
                Severity.ERROR,
                f"{origin}'s backward made inf/NaN at step {t0}: its output gradient was "
                "finite, the gradient it passed back was not",
                BACKWARD_ADVICE,
                [origin],
                evidence,
                0.0,
                t0,
                last,
            )
        ]
    params = _bad(view.table(Kind.PARAM_GRAD, Stat.NONFINITE), t0)
    return [
        Verdict(
            VerdictId.NONFINITE_VALUES,
            Severity.ERROR,
            f"inf/NaN from step {t0} on"
            + (f", first in the gradient of {params[0]}" if params else " (in the loss)"),
            "check the inputs and the loss at that step; clip gradients at norm 1.0",
            params[:10],
            evidence,
            0.0,
            t0,
            last,
        )
    ]
