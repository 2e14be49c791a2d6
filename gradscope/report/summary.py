"""The sweep report's first screen in words: a few sentences generated from the runs (the
trainability map beside them is gradscope.plot.trainability_map)."""

from __future__ import annotations

import html
import math

import numpy as np

from gradscope.diagnose import EXPLODING_RATIO, VANISHING_RATIO
from gradscope.lab.sweep import SweepResult
from gradscope.lab.sweep.result import CHANCE, TRAINS


def story(result: SweepResult) -> list[str]:
    """Three to six sentences: where each variant stops training, the measured decay against
    theory, and what changed during training in the deepest runs."""
    runs, config = result.runs, result.config
    first_seed = runs[runs["seed"] == runs["seed"].min()]
    out = []
    trains, fails = [], []
    for variant, group in first_seed.groupby("variant", sort=False):
        group = group.sort_values("depth")
        bad = group[~(group["test_acc"] > TRAINS)]
        if bad.empty:
            trains.append(f"{variant} (to depth {int(group['depth'].max())})")
            continue
        d = int(bad["depth"].iloc[0])
        how = "diverges" if bool(bad["diverged"].iloc[0]) else "stops learning"
        fails.append(f"{variant} {how} from depth {d} ({float(bad['test_acc'].iloc[0]):.0%})")
    if trains:
        out.append("Trains at every depth swept: " + ", ".join(trains) + ".")
    if fails:
        text = "; ".join(fails)
        out.append(text[0].upper() + text[1:] + ".")
    plain = first_seed[first_seed["variant"] == "plain"].sort_values("depth")
    if len(plain) and plain["grad_decay_init"].notna().any():
        deep = plain.iloc[-1]
        theory = deep.get("grad_decay_theory", math.nan)
        versus = (
            f" (mean-field theory for {config.activation}, {config.init} init: {theory:.3f})"
            if isinstance(theory, float) and math.isfinite(theory)
            else ""
        )
        out.append(
            f"At init the plain stack loses {deep['grad_decay_init']:.3f} decades of gradient "
            f"per layer{versus}: at depth {int(deep['depth'])} the first layer gets "
            f"{deep['grad_ratio_init']:.2g} of the last layer's gradient."
        )
    deepest = result.deepest()
    steps = config.steps
    for r in deepest.itertuples():
        start, end = r.grad_ratio_init, r.grad_ratio_end
        if not (np.isfinite(start) and np.isfinite(end)):
            continue
        healthy_start = VANISHING_RATIO <= start <= EXPLODING_RATIO
        if healthy_start and end < VANISHING_RATIO:
            chance = ", chance" if not r.test_acc > CHANCE else ""
            out.append(
                f"{r.variant} at depth {r.depth} starts healthy (ratio {start:.2g}) and its "
                f"first layer's gradient falls to {end:.2g} of the last's by step "
                f"{(steps or 0) - 1}; test accuracy {r.test_acc:.0%}{chance}."
            )
    return out[:6]


def story_html(sentences: list[str]) -> str:
    return "<ul class='story'>" + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul>"
