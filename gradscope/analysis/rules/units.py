"""Dead and saturated units, over the whole run: `dead_units` (outputs zero for every
sample) and `saturated_units` (bounded activations at their bounds), naming the first
module in forward order where they arise (the modules after it inherit them)."""

from __future__ import annotations

import pandas as pd

from gradscope.analysis.view import RunView, span
from gradscope.schema import Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, share

# Share of a module's outputs that are exactly zero: a healthy ReLU sits near 50%, max-pool
# and BatchNorm CNNs of the tuning half up to 89% (median over steps); a dead layer ~100%.
DEAD_FRAC = 0.97
DEAD_SHARE = 0.5
# Bounded activations within 1% of a bound: healthy tanh up to 38% in the tuning half.
SATURATED_FRAC = 0.6
SATURATED_SHARE = 0.5


def _first(view: RunView, stat: Stat, limit: float, need: float) -> tuple[list[str], dict]:
    table = view.finite_steps(view.table(Kind.ACTIVATION, stat))
    if table.empty:
        return [], {}
    table = table[[c for c in table.columns if c not in view.stream]]
    hits, spans = [], {}
    for module in table.columns:
        s = span(table[module] >= limit)
        if s.share >= need:
            hits.append(str(module))
            spans[str(module)] = (s, float(table[module].median()))
    return hits, spans


def check(view: RunView) -> list[Verdict]:
    out = []
    last = int(view.steps[-1]) if len(view.steps) else 0
    for stat, limit, need, vid, words, advice in (
        (
            Stat.ZERO_FRAC,
            DEAD_FRAC,
            DEAD_SHARE,
            VerdictId.DEAD_UNITS,
            "zero for every sample",
            "lower the learning rate, use kaiming init with biases at 0, or a leaky "
            "activation (LeakyReLU, GELU)",
        ),
        (
            Stat.SATURATED_FRAC,
            SATURATED_FRAC,
            SATURATED_SHARE,
            VerdictId.SATURATED_UNITS,
            "at the activation's bounds",
            "normalize the activation's input (LayerNorm), use xavier init, or ReLU/GELU",
        ),
    ):
        hits, spans = _first(view, stat, limit, need)
        if not hits:
            continue
        module = hits[0]
        s, median = spans[module]
        out.append(
            Verdict(
                vid,
                Severity.WARNING,
                f"{median:.0%} of {module}'s outputs are {words} (median) on {share(s.share)} "
                f"of the steps, from step {s.first} on"
                + (f"; {len(hits) - 1} later modules inherit it" if len(hits) > 1 else ""),
                advice,
                hits,
                {"median_fraction": pd.Series({m: spans[m][1] for m in hits}).to_dict()},
                limit,
                s.first,
                s.last if s.last is not None else last,
            )
        )
    return out
