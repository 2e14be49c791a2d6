"""One verdict per root cause: symptoms that a root cause explains become its evidence.

A verdict is a symptom of another when the other's id explains it (EXPLAINS) and the other
began no later. Roots are ranked by PRIORITY (the cause to fix first), info last.
"""

from __future__ import annotations

from dataclasses import replace

from gradscope.schema import Severity
from gradscope.schema import VerdictId as V
from gradscope.verdict import Verdict

NONFINITE = {V.NONFINITE_FORWARD, V.NONFINITE_BACKWARD, V.NONFINITE_VALUES}
UNITS = {V.DEAD_UNITS, V.SATURATED_UNITS}
FLOW = {V.EXPLODING_GRADIENTS, V.VANISHING_GRADIENTS}

# Which symptoms each cause can produce.
EXPLAINS: dict[str, set[str]] = {
    V.GRADIENTS_NOT_ZEROED: {V.LR_TOO_HIGH, V.GRADIENT_SPIKE, V.LOSS_NOT_DECREASING}
    | NONFINITE
    | UNITS
    | FLOW,
    V.NO_UPDATES: {V.LOSS_NOT_DECREASING},
    V.NOT_IN_OPTIMIZER: {V.GRADIENTS_NOT_ZEROED},  # optimizer.zero_grad skips them
    V.GRADIENT_SPIKE: {V.LR_TOO_HIGH, V.LOSS_NOT_DECREASING} | NONFINITE | UNITS | FLOW,
    V.LR_TOO_HIGH: {V.GRADIENT_SPIKE, V.LOSS_NOT_DECREASING} | NONFINITE | UNITS | FLOW,
    V.UNNORMALIZED_INPUTS: {V.LR_TOO_HIGH, V.GRADIENT_SPIKE, V.LOSS_NOT_DECREASING} | UNITS | FLOW,
    V.EXPLODING_GRADIENTS: {V.SATURATED_UNITS, V.LOSS_NOT_DECREASING},
    V.DEAD_UNITS: {V.VANISHING_GRADIENTS, V.LOSS_NOT_DECREASING},
    V.SATURATED_UNITS: {V.VANISHING_GRADIENTS, V.LOSS_NOT_DECREASING},
    V.VANISHING_GRADIENTS: {V.LOSS_NOT_DECREASING, V.DEAD_UNITS},  # see _dead_within_starved
    V.NO_GRADIENT: set(),
}
# Causes whose time matters: they explain a symptom only if they began no later.
TIMED = {V.GRADIENT_SPIKE, V.LR_TOO_HIGH, V.GRADIENTS_NOT_ZEROED} | NONFINITE

PRIORITY = [
    V.NOT_IN_OPTIMIZER,
    V.GRADIENTS_NOT_ZEROED,
    V.NO_UPDATES,
    V.UNNORMALIZED_INPUTS,
    V.GRADIENT_SPIKE,
    V.LR_TOO_HIGH,
    V.NONFINITE_FORWARD,
    V.NONFINITE_BACKWARD,
    V.NONFINITE_VALUES,
    V.EXPLODING_GRADIENTS,
    V.DEAD_UNITS,
    V.SATURATED_UNITS,
    V.VANISHING_GRADIENTS,
    V.NO_GRADIENT,
    V.LOSS_NOT_DECREASING,
]


def _rank(v: Verdict) -> int:
    return PRIORITY.index(V(v.id)) if v.id in PRIORITY else len(PRIORITY)


def _onset(v: Verdict) -> int:
    return v.first_step if v.first_step is not None else 0


def _dead_within_starved(dead: Verdict, vanishing: Verdict) -> bool:
    """Dead units starve the layers before them and the layer that reads them (its input is
    zero); where layers further toward the output are starved too, the signal shrinking over
    depth (init, depth) made both: the vanishing gradient is the cause, the units dead deep in
    the stack one of its symptoms."""
    at = dead.evidence.get("reads_position", dead.evidence.get("position"))
    reach = vanishing.evidence.get("last_starved_position")
    return at is not None and reach is not None and at < reach


def _explains(root: Verdict, symptom: Verdict) -> bool:
    if symptom.id not in EXPLAINS.get(root.id, set()):
        return False
    if root.id == V.NOT_IN_OPTIMIZER:  # only the same parameters' unzeroed gradients
        return bool(set(symptom.layers) & set(root.layers))
    if root.id == V.DEAD_UNITS and symptom.id == V.VANISHING_GRADIENTS:
        return not _dead_within_starved(root, symptom)
    if root.id == V.VANISHING_GRADIENTS and symptom.id == V.DEAD_UNITS:
        return _dead_within_starved(symptom, root)
    if symptom.id == V.LOSS_NOT_DECREASING:  # a whole-run symptom: dated by the loss's quarters
        return True
    if root.id in TIMED or symptom.id in TIMED:
        return _onset(root) <= _onset(symptom)
    return True


def rank(verdicts: list[Verdict]) -> list[Verdict]:
    """Root causes, each with the symptoms it explains folded into `explains` and its
    evidence (`symptoms`: their messages); ranked by PRIORITY, info after the rest."""
    # (causes come before what they explain in PRIORITY, so one pass in that order suffices;
    # dead units within a vanishing gradient's starved layers go after it)
    vanishing = [v for v in verdicts if v.id == V.VANISHING_GRADIENTS]

    def place(v: Verdict) -> int:
        if v.id == V.DEAD_UNITS and any(_dead_within_starved(v, w) for w in vanishing):
            return _rank(vanishing[0]) + 1
        return _rank(v)

    order = sorted(verdicts, key=lambda v: (place(v), _onset(v)))
    roots: list[Verdict] = []
    folded: dict[int, list[Verdict]] = {}
    for v in order:
        owner = next((i for i, r in enumerate(roots) if _explains(r, v)), None)
        if owner is None:
            roots.append(v)
        else:
            folded.setdefault(owner, []).append(v)
    out = []
    for i, root in enumerate(roots):
        symptoms = folded.get(i, [])
        if symptoms:
            root = replace(
                root,
                explains=[s.id for s in symptoms],
                evidence=root.evidence | {"symptoms": [f"{s.id}: {s.message}" for s in symptoms]},
            )
        out.append(root)
    info = (Severity.INFO, Severity.OK)
    return sorted(out, key=lambda v: (v.severity in info, _rank(v), _onset(v)))
