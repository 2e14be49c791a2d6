"""The sweep report's first screen: a trainability map (variant x depth, colour = test
accuracy, each cell marked with its verdict) and a few sentences generated from the runs."""

from __future__ import annotations

import html
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gradscope.diagnose import EXPLODING_RATIO, VANISHING_RATIO  # noqa: E402
from gradscope.report.html import figure_html  # noqa: E402

CHANCE = 0.15  # test accuracy at or below this on 10 classes: nothing was learned
TRAINS = 0.5  # test accuracy above this: the run trains


def cell_verdict(row: Any) -> str:
    """One word for a run: diverged, chance, vanishing, exploding or healthy."""
    ids = set(str(row.verdicts).split(";")) if isinstance(row.verdicts, str) else set()
    if bool(row.diverged) or "nonfinite_values" in ids:
        return "diverged"
    if not row.test_acc > CHANCE:
        return "chance"
    if "vanishing_gradients" in ids:
        return "vanishing"
    if "exploding_gradients" in ids:
        return "exploding"
    return "healthy"


def trainability_map(runs: pd.DataFrame, variants: list[str]) -> str:
    """Variant x depth, colour = mean test accuracy over seeds, the verdict in each cell."""
    runs = runs.assign(word=[cell_verdict(r) for r in runs.itertuples()])
    depths = sorted(runs["depth"].unique())
    acc = runs.pivot_table(index="variant", columns="depth", values="test_acc", aggfunc="mean")
    acc = acc.reindex(index=variants, columns=depths)
    words = runs.groupby(["variant", "depth"])["word"].agg(lambda w: w.mode().iloc[0])
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2.4, 0.55 * len(variants) + 1.2))
    image = ax.imshow(acc.to_numpy(dtype=float), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, variant in enumerate(variants):
        for j, depth in enumerate(depths):
            value = acc.iat[i, j]
            if math.isnan(value):
                continue
            word = words.get((variant, depth), "")
            ax.text(j, i, f"{value:.0%}\n{word}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [str(d) for d in depths])
    ax.set_yticks(range(len(variants)), variants)
    ax.set(xlabel="depth", title="Trainability: test accuracy after training, and the verdict")
    fig.colorbar(image, ax=ax, label="test accuracy", fraction=0.03)
    fig.tight_layout()
    return figure_html(fig, "trainability map: variant by depth, test accuracy and verdict")


def story(runs: pd.DataFrame, config: dict[str, Any]) -> list[str]:
    """Three to six sentences: where each variant stops training, the measured decay against
    theory, and what changed during training in the deepest runs."""
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
            f" (mean-field theory for {config.get('activation')}, {config.get('init')} init: "
            f"{theory:.3f})"
            if isinstance(theory, float) and math.isfinite(theory)
            else ""
        )
        out.append(
            f"At init the plain stack loses {deep['grad_decay_init']:.3f} decades of gradient "
            f"per layer{versus}: at depth {int(deep['depth'])} the first layer gets "
            f"{deep['grad_ratio_init']:.2g} of the last layer's gradient."
        )
    deepest = first_seed.sort_values("depth").groupby("variant", sort=False).tail(1)
    steps = config.get("steps")
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
