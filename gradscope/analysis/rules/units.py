"""Dead and saturated units, over the whole run: `dead_units` (units, i.e. features or
channels, zero for every sample of the batch: the recorder's `dead_units / units`) and
`saturated_units` (bounded activations at their bounds), naming the first module in forward
order where they arise (the modules after it, a max-pool or a dropout, inherit them and are
listed after it, never alone)."""

from __future__ import annotations

import pandas as pd

from gradscope.analysis.view import RunView, module_of, span
from gradscope.schema import Kind, Severity, Stat, VerdictId
from gradscope.verdict import Verdict, of_steps, plural

# Share of a module's units dead (zero for every sample of the step's batch). Healthy runs of
# the tuning half: medians over steps up to 38% (batches of 4 samples: a unit is easily zero
# for all four), 59% on the worst step; a layer killed by a bias at -5: 100%.
DEAD_FRAC = 0.7
DEAD_SHARE = 0.5
# Recordings made before the per-unit statistic existed: exact-zero elements instead (a
# healthy ReLU sits near 50%, max-pool CNNs of the tuning half up to 89%).
DEAD_ELEMENT_FRAC = 0.97
# Bounded activations within 1% of a bound: healthy tanh up to 38% in the tuning half.
SATURATED_FRAC = 0.6
SATURATED_SHARE = 0.5
# A module whose exact-zero share exceeds the module before it by no more than this adds no
# zeros of its own (a dropout's p adds p; a ReLU adds about half).
PASS_MARGIN = 0.02


def dead_fraction(view: RunView) -> tuple[pd.DataFrame, float]:
    """Per step and module: the share of units dead (or, for older recordings without the
    per-unit statistic, of exact-zero elements) and the threshold that applies to it."""
    dead = view.table(Kind.ACTIVATION, Stat.DEAD_UNITS)
    units = view.table(Kind.ACTIVATION, Stat.UNITS)
    if dead.empty or units.empty:
        return view.table(Kind.ACTIVATION, Stat.ZERO_FRAC), DEAD_ELEMENT_FRAC
    return dead / units.where(units > 0), DEAD_FRAC


def pass_through(view: RunView) -> set[str]:
    """Modules that only pass on the zeros of the module before them (dropout, pooling,
    flatten, identity): their share of exact-zero outputs (median over steps) is no higher
    than that module's. They cannot kill a unit; a flattened copy of a channel map even counts
    each (channel, position) as a unit, so judging them finds dead "units" that are only
    zero pixels."""
    zeros = view.finite_steps(view.table(Kind.ACTIVATION, Stat.ZERO_FRAC))
    if zeros.empty:
        return set()
    med = zeros.median()
    cols = [str(c) for c in zeros.columns]
    return {b for a, b in zip(cols[:-1], cols[1:], strict=True) if med[b] <= med[a] + PASS_MARGIN}


def _first(
    view: RunView, table: pd.DataFrame, limit: float, need: float, skip: set[str] | None = None
) -> tuple[list[str], dict]:
    table = view.finite_steps(table)
    if table.empty:
        return [], {}
    skip = skip or set()
    table = table[[c for c in table.columns if c not in view.stream and str(c) not in skip]]
    hits, spans = [], {}
    for module in table.columns:
        s = span(table[module] >= limit)
        if s.share >= need:
            hits.append(str(module))
            spans[str(module)] = (s, float(table[module].median()))
    return hits, spans


def _next_weighted(view: RunView, order: list[str], module: str) -> int | None:
    """The forward position of the first module with a weight matrix after `module`."""
    if module not in order:
        return None
    weighted = {module_of(m) for m in view.matrices}
    after = [i for i in range(order.index(module) + 1, len(order)) if order[i] in weighted]
    return after[0] if after else None


def check(view: RunView) -> list[Verdict]:
    out = []
    last = int(view.steps[-1]) if len(view.steps) else 0
    dead, dead_limit = dead_fraction(view)
    inherit = pass_through(view)
    order = [str(c) for c in view.table(Kind.ACTIVATION, Stat.RMS).columns]
    for table, limit, need, vid, words, advice in (
        (
            dead,
            dead_limit,
            DEAD_SHARE,
            VerdictId.DEAD_UNITS,
            "units are zero for every sample of the batch"
            if dead_limit == DEAD_FRAC
            else "outputs are exactly zero",
            "lower the learning rate, use kaiming init with biases at 0, or a leaky "
            "activation (LeakyReLU, GELU)",
        ),
        (
            view.table(Kind.ACTIVATION, Stat.SATURATED_FRAC),
            SATURATED_FRAC,
            SATURATED_SHARE,
            VerdictId.SATURATED_UNITS,
            "outputs are at the activation's bounds",
            "normalize the activation's input (LayerNorm), use xavier init, or ReLU/GELU",
        ),
    ):
        hits, spans = _first(
            view, table, limit, need, inherit if vid == VerdictId.DEAD_UNITS else None
        )
        if not hits:
            continue
        module = hits[0]
        s, median = spans[module]
        out.append(
            Verdict(
                vid,
                Severity.WARNING,
                f"{median:.0%} of {module}'s {words} (median) on {of_steps(s.share)}"
                f", from step {s.first} on"
                + (
                    f"; {plural(len(hits) - 1, 'later module')} inherit{'s' if len(hits) == 2 else ''} it"
                    if len(hits) > 1
                    else ""
                ),
                advice,
                hits,
                {
                    "median_fraction": pd.Series({m: spans[m][1] for m in hits}).to_dict(),
                    "position": order.index(module) if module in order else None,
                    # the first layer with weights after it reads its zeros: its weight
                    # gradient is starved by them too (gradscope.analysis.rank)
                    "reads_position": _next_weighted(view, order, module),
                },
                limit,
                s.first,
                s.last if s.last is not None else last,
            )
        )
    return out
