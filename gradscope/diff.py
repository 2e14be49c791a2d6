"""The diff of two saved runs, layer by layer, for CI after an architecture or init change:
statistics that moved, layers without a match, and verdicts that appeared, went or got worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gradscope import frame as fr
from gradscope.diagnose import SEVERITIES, Verdict
from gradscope.runs import Run, RunError
from gradscope.schema import TOTAL, Kind, Stat, VerdictId

# a statistic that changed by more than this factor is listed as changed
CHANGE_FACTOR = 2.0
# a verdict in both runs is worse in B when its severity rises, or when its measure (below)
# moves the bad way by more than this factor (e.g. a first/last ratio 1e-4 -> 1e-6)
WORSE_FACTOR = 10.0
# the evidence number that says how bad a verdict is, and which way is worse (+1: larger);
# verdicts over a set of layers are measured by how many layers they name
MEASURES: dict[str, tuple[str, int]] = {
    VerdictId.VANISHING_GRADIENTS: ("median_ratio", -1),
    VerdictId.EXPLODING_GRADIENTS: ("first_last_ratio", +1),
    VerdictId.GRADIENT_SPIKE: ("gradient_jump", +1),
    VerdictId.LR_TOO_HIGH: ("update_ratio", +1),
}
_COMPARED = [
    (Kind.PARAM_GRAD, Stat.NORM),
    (Kind.UPDATE, Stat.RATIO),
    (Kind.ACTIVATION, Stat.RMS),
    (Kind.ACTIVATION, Stat.ZERO_FRAC),
    (Kind.ACTIVATION_GRAD, Stat.NORM),
]


@dataclass(frozen=True)
class Worsened:
    """A verdict both runs have, worse in B: the two, and by what factor its measure moved
    the bad way (inf when its severity rose)."""

    a: Verdict
    b: Verdict
    measure: str
    factor: float


@dataclass(frozen=True)
class RunDiff:
    """How run B differs from run A, layer by layer, at their last common step."""

    step: int
    changes: pd.DataFrame  # layer, kind, stat, a, b, ratio: the rows that moved most
    appeared: list[Verdict]  # in B, not in A
    disappeared: list[Verdict]  # in A, not in B
    worsened: list[Worsened] = field(default_factory=list)  # in both, worse in B
    only_a: list[str] = field(default_factory=list)  # layers of A with no match in B
    only_b: list[str] = field(default_factory=list)  # layers of B with no match in A
    aligned: str = ""  # how names were aligned ("" when they matched as they are)
    matched: int = 0  # layers compared

    @property
    def worse(self) -> bool:
        """A warning or error in B that A did not have, or one of A's got worse in B."""
        new = any(
            SEVERITIES.index(v.severity) >= SEVERITIES.index("warning") for v in self.appeared
        )
        return new or bool(self.worsened)


def _name_prefix(layers: set[str]) -> str:
    """The first dotted name part every layer shares ("model." under Lightning), or ""."""
    heads = {name.partition(".")[0] for name in layers if "." in name}
    if len(heads) == 1 and all("." in name for name in layers):
        return heads.pop() + "."
    return ""


def _strip(frame: pd.DataFrame, prefix: str) -> pd.DataFrame:
    if not prefix:
        return frame
    layer = frame["layer"].astype(str)
    return frame.assign(layer=layer.where(~layer.str.startswith(prefix), layer.str[len(prefix) :]))


def _align(a: pd.DataFrame, b: pd.DataFrame) -> tuple[str, str]:
    """The prefixes to strip from A's and B's layer names so that most layers match: a
    LightningModule's `model.` against the same network trained in a plain loop."""
    la, lb = set(a["layer"]) - {TOTAL}, set(b["layer"]) - {TOTAL}
    pa, pb = _name_prefix(la), _name_prefix(lb)

    def strip(names: set[str], p: str) -> set[str]:
        return {n[len(p) :] if p and n.startswith(p) else n for n in names}

    best, choice = len(la & lb), ("", "")
    for cand in ((pa, ""), ("", pb), (pa, pb)):
        overlap = len(strip(la, cand[0]) & strip(lb, cand[1]))
        if overlap > best:
            best, choice = overlap, cand
    return choice


def _measure(v: Verdict, key: str) -> float:
    if key == "layers":
        return float(len(v.layers))
    try:
        return float(v.evidence.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan


def _worsened(a: list[Verdict], b: list[Verdict], factor: float) -> list[Worsened]:
    found = []
    first_a = {v.id: v for v in reversed(a)}
    for vb in b:
        va = first_a.get(vb.id)
        if va is None or vb.id == "healthy":
            continue
        if SEVERITIES.index(vb.severity) > SEVERITIES.index(va.severity):
            found.append(Worsened(va, vb, "severity", math.inf))
            continue
        key, sign = MEASURES.get(vb.id, ("layers", +1))
        x, y = _measure(va, key), _measure(vb, key)
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        bad, good = (y, x) if sign > 0 else (x, y)
        moved = math.inf if good == 0 and bad > 0 else (bad / good if good > 0 else 1.0)
        if moved > factor:
            found.append(Worsened(va, vb, key, moved))
    return found


def diff_runs(
    a: Run, b: Run, strip_prefix: str | None = None, worse_factor: float = WORSE_FACTOR
) -> RunDiff:
    """Compares two runs, aligned by layer name and step (their last common step).

    Layer names are aligned first: `strip_prefix` is removed from both runs' names; without
    it, a first name part shared by every layer of one run (`model.` under Lightning) is
    removed where that matches more layers. Layers left without a match are listed.

    Raises:
        RunError: the runs share no recorded step or no layer.
    """
    common = sorted(set(a.frame["step"]) & set(b.frame["step"]))
    if not common:
        raise RunError(f"{a.path} and {b.path} share no recorded step")
    step = int(common[-1])
    fa, fb = fr.select(a.frame, step=step), fr.select(b.frame, step=step)
    if strip_prefix:
        pa = pb = strip_prefix
    else:
        pa, pb = _align(fa, fb)
    fa, fb = _strip(fa, pa), _strip(fb, pb)
    aligned = ", ".join(
        f"'{p}' stripped from {which}'s layer names" for p, which in ((pa, "A"), (pb, "B")) if p
    )
    rows = []
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    for kind, stat in _COMPARED:
        sa = fr.select(fa, kind, stat).set_index("layer")["value"]
        sb = fr.select(fb, kind, stat).set_index("layer")["value"]
        seen_a |= set(sa.index) - {TOTAL}
        seen_b |= set(sb.index) - {TOTAL}
        for layer in sa.index.intersection(sb.index):
            rows.append((layer, str(kind), str(stat), float(sa[layer]), float(sb[layer])))
    layers_a = set(fa["layer"]) - {TOTAL}
    layers_b = set(fb["layer"]) - {TOTAL}
    if not layers_a & layers_b:
        raise RunError(
            f"{a.path} and {b.path} have no layer in common: not runs of the same model "
            f"({len(layers_a)} and {len(layers_b)} layers; pass --strip-prefix if one run's "
            "names carry a wrapper's prefix)"
        )
    changes = pd.DataFrame(rows, columns=["layer", "kind", "stat", "a", "b"])
    a_values, b_values = changes["a"].to_numpy(), changes["b"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a_values == b_values, 1.0, b_values / a_values)
        moved = np.abs(np.log(ratio))
    changes["ratio"] = ratio
    changes = changes.assign(moved=moved)
    changes = changes[(changes["moved"] > math.log(CHANGE_FACTOR)) | ~np.isfinite(moved)]
    changes = changes.sort_values("moved", ascending=False, na_position="first")
    same_a = {v.id for v in a.verdicts}
    same_b = {v.id for v in b.verdicts}
    # a verdict whose severity changed is 'worsened' or better, not gone and new
    appeared = [v for v in b.verdicts if v.id not in same_a and v.id != "healthy"]
    disappeared = [v for v in a.verdicts if v.id not in same_b and v.id != "healthy"]
    return RunDiff(
        step,
        changes.drop(columns="moved").reset_index(drop=True),
        appeared,
        disappeared,
        _worsened(a.verdicts, b.verdicts, worse_factor),
        sorted(seen_a - seen_b),
        sorted(seen_b - seen_a),
        aligned,
        len(seen_a & seen_b),
    )
