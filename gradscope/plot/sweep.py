"""Figures of a depth sweep: the trainability map, ratio and decay slope against depth,
gradient profiles per depth, per-variant heatmaps, signal propagation, activations, accuracy.

Each takes the sweep's results (a `gradscope.lab.sweep.SweepResult`: the merged frame, the
run table, the losses) or the part of them it needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from gradscope import frame as fr
from gradscope.lab import theory
from gradscope.lab.models import Variant
from gradscope.lab.sweep.result import cell_verdict, deepest_runs
from gradscope.plot.common import PlotError, new_axes
from gradscope.plot.run import heatmap
from gradscope.schema import Kind, Stat


def variant_palette() -> dict[str, Any]:
    """The same colour for a variant in every figure."""
    colors = sns.color_palette("colorblind", len(Variant))
    return {v.value: colors[i] for i, v in enumerate(Variant)}


def _runs(runs: Any) -> pd.DataFrame:
    """The run table of a sweep's results (a SweepResult) or the table itself."""
    runs = getattr(runs, "runs", runs)
    if not isinstance(runs, pd.DataFrame):
        raise PlotError(f"expected a sweep's run table or results, got {type(runs).__name__}")
    missing = {"variant", "depth", "seed"} - set(runs.columns)
    if missing:
        raise PlotError(f"the run table lacks the column(s) {sorted(missing)}")
    if runs.empty:
        raise PlotError("no finished run in the sweep yet")
    return runs


def _when(phase: str) -> str:
    return "at init" if phase == "init" else "after training"


def trainability_map(
    runs: Any,
    variants: Sequence[str] | None = None,
    depths: Sequence[int] | None = None,
    *,
    ax: plt.Axes | None = None,
) -> plt.Axes:
    """Variant x depth, colour = mean test accuracy over seeds (fixed 0 to 1), the verdict
    word in each cell; cells not run yet are blank (pass `depths` to show the planned ones).

    Example:
        >>> import pandas as pd, gradscope.plot as gp
        >>> runs = pd.DataFrame({"variant": ["plain", "preln"], "depth": [8, 8], "seed": 0,
        ...     "test_acc": [0.1, 0.9], "diverged": False, "verdicts": ["", ""]})
        >>> gp.trainability_map(runs).get_xlabel()
        'depth'
    """
    runs = _runs(runs)
    if not np.isfinite(runs["test_acc"].to_numpy(dtype=float)).any():
        raise PlotError("no finite test accuracy in the run table")
    runs = runs.assign(word=[cell_verdict(r) for r in runs.itertuples()])
    variants = list(variants) if variants is not None else list(dict.fromkeys(runs["variant"]))
    depths = sorted(set(depths) if depths is not None else set(runs["depth"]))
    acc = runs.pivot_table(index="variant", columns="depth", values="test_acc", aggfunc="mean")
    acc = acc.reindex(index=variants, columns=depths)
    words = runs.groupby(["variant", "depth"])["word"].agg(lambda w: w.mode().iloc[0])
    ax = new_axes(ax, (1.2 * len(depths) + 2.4, 0.55 * len(variants) + 1.2))
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
    ax.set(xlabel="depth", ylabel="variant",
           title="Trainability: test accuracy after training, and the verdict")  # fmt: skip
    ax.figure.colorbar(image, ax=ax, label="test accuracy", fraction=0.03)
    return ax


def ratio_vs_depth(
    runs: Any, when: str = "init", *, palette: dict[str, Any] | None = None,
    ax: plt.Axes | None = None,
) -> plt.Axes:  # fmt: skip
    """First/last gradient norm ratio against depth per variant ("init" or "end"), log-log;
    bands span seeds.

    Example:
        >>> import pandas as pd, gradscope.plot as gp
        >>> runs = pd.DataFrame({"variant": "plain", "depth": [2, 8], "seed": 0,
        ...     "grad_ratio_init": [0.5, 1e-3]})
        >>> gp.ratio_vs_depth(runs).get_xscale()
        'log'
    """
    runs = _runs(runs)
    col = f"grad_ratio_{when}"
    data = runs[runs[col] > 0] if col in runs else runs.iloc[:0]
    if data.empty:
        raise PlotError(f"no positive {col} in the run table")
    ax = new_axes(ax, (5, 4))
    sns.lineplot(data=data, x="depth", y=col, hue="variant", palette=palette or variant_palette(),
                 marker="o", ax=ax)  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="depth (log scale)",
           ylabel="first/last gradient norm (log scale)",
           title="First/last gradient ratio " + _when(when))  # fmt: skip
    return ax


def slope_vs_depth(
    runs: Any, when: str = "init", *, palette: dict[str, Any] | None = None,
    ax: plt.Axes | None = None,
) -> plt.Axes:  # fmt: skip
    """Decay slope (decades of gradient lost per layer toward the input) against depth per
    variant, with the plain stack's mean-field prediction (`grad_decay_theory`) dotted.

    Example:
        >>> import pandas as pd, gradscope.plot as gp
        >>> runs = pd.DataFrame({"variant": "plain", "depth": [2, 8], "seed": 0,
        ...     "grad_decay_init": [0.4, 0.39], "grad_decay_theory": [0.39, 0.39]})
        >>> gp.slope_vs_depth(runs).get_ylabel()
        'decades lost per layer (>0 vanishing)'
    """
    runs = _runs(runs)
    col = f"grad_decay_{when}"
    if col not in runs or not np.isfinite(runs[col].to_numpy(dtype=float)).any():
        raise PlotError(f"no finite {col} in the run table")
    palette = palette or variant_palette()
    ax = new_axes(ax, (5, 4))
    sns.lineplot(data=runs, x="depth", y=col, hue="variant", palette=palette, marker="o", ax=ax)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    predicted = runs.get("grad_decay_theory", pd.Series(dtype=float))
    predicted = predicted[runs["variant"] == "plain"].dropna()
    if len(predicted) and when == "init":  # the mean-field prediction (gradscope.lab.theory)
        value = float(predicted.iloc[0])
        ax.axhline(value, color=palette.get("plain", "black"), lw=1.2, ls=":",
                   label=f"plain, theory ({value:.3g})")  # fmt: skip
        ax.legend(fontsize=8)
    ax.set(xscale="log", xlabel="depth (log scale)", ylabel="decades lost per layer (>0 vanishing)",
           title="Decay slope " + _when(when))  # fmt: skip
    return ax


def profiles_by_depth(frame: pd.DataFrame, variants: Sequence[str]) -> sns.FacetGrid:
    """Gradient norm per weight matrix, one line per depth, a panel per variant and phase
    (at init, after training); bands span seeds. Figure-level: returns the FacetGrid."""
    out = []
    for (variant, depth, seed), run in frame.groupby(["variant", "depth", "seed"], sort=False):
        steps = fr.select(run, Kind.PARAM_GRAD)["step"]
        if steps.empty:
            continue
        for phase, step in (("at init (step 0)", steps.min()), ("after training", steps.max())):
            prof = fr.gradient_profile(run, int(step))
            out.append(prof.assign(variant=variant, depth=depth, seed=seed, phase=phase))
    if not out:
        raise PlotError("no gradient norms in the sweep's frame")
    data = pd.concat(out, ignore_index=True)
    data["norm"] = data["norm"].where(data["norm"] > 0)
    grid = sns.relplot(data=data, x="index", y="norm", hue="depth", col="variant", row="phase",
                       col_order=list(variants), kind="line", palette="viridis", height=2.8,
                       aspect=1.1, facet_kws={"sharex": False}, legend="full")  # fmt: skip
    grid.set(yscale="log")
    grid.set_axis_labels("weight matrix (0 = input side)", "gradient norm (log scale)")
    grid.set_titles("{col_name} | {row_name}")
    grid.figure.suptitle("Gradient norm per layer, one line per depth", y=1.02)
    return grid


def _run_rows(frame: pd.DataFrame, variant: str, depth: int, seed: int) -> pd.DataFrame:
    return frame[
        (frame["variant"] == variant) & (frame["depth"] == depth) & (frame["seed"] == seed)
    ]


def deepest_heatmaps(frame: pd.DataFrame, runs: Any, variants: Sequence[str]) -> plt.Figure:
    """The gradient-norm heatmap (`gradscope.plot.heatmap`, fixed colour scale) of the
    deepest run of each variant, side by side."""
    runs = _runs(runs)
    deepest = deepest_runs(runs).set_index("variant")
    present = [v for v in variants if v in deepest.index]
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 4.6), squeeze=False)
    for ax, variant in zip(axes[0], present, strict=True):
        d, s = int(deepest.loc[variant, "depth"]), int(deepest.loc[variant, "seed"])
        run = _run_rows(frame, variant, d, s)[["step", "layer", "kind", "stat", "value"]]
        heatmap(run, ax=ax)
        ax.set(title=f"{variant}, depth {d}", ylabel="weight matrix")
        ax.tick_params(axis="y", labelsize=6)
    fig.suptitle("Gradient norm, layer x step, deepest run of each variant (fixed log10 scale)")
    fig.tight_layout()
    return fig


def signal_propagation(
    frame: pd.DataFrame, runs: Any, config: dict[str, Any] | None = None,
    palette: dict[str, Any] | None = None,
) -> plt.Figure:  # fmt: skip
    """Brock et al. (2021)'s signal propagation plots at init, deepest run of each variant:
    per block, the stream's rms, the residual branch's rms and the gradient at the block,
    with the Pre-LN and residual stream theory where `config` gives the settings."""
    runs = _runs(runs)
    palette = palette or variant_palette()
    rows = []
    for r in deepest_runs(runs, every_seed=True).itertuples():
        run = _run_rows(frame, r.variant, r.depth, r.seed)
        run = run[run["step"] == run["step"].min()]
        stream = fr.stream_layers(run)
        index = {name: i for i, name in enumerate(stream)}
        for kind, stat, what, layers in (
            (Kind.ACTIVATION, Stat.RMS, "stream rms", stream),
            (Kind.ACTIVATION, Stat.RMS, "branch rms", [f"{b}.fc2" for b in stream]),
            (Kind.ACTIVATION_GRAD, Stat.NORM, "gradient at the block", stream),
        ):
            part = fr.select(run, kind, stat, layers=layers)
            block = part["layer"].str.removesuffix(".fc2").map(index)
            rows.append(part.assign(block=block, what=what, variant=r.variant))
    data = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    if data.empty:
        raise PlotError("no residual blocks in the sweep's runs")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, what in zip(axes, ("stream rms", "branch rms", "gradient at the block"), strict=True):
        part = data[(data["what"] == what) & (data["value"] > 0)]
        if len(part):
            sns.lineplot(data=part, x="block", y="value", hue="variant", palette=palette, ax=ax)
        ax.set(yscale="log", title=f"{what.capitalize()} at init", xlabel="block (0 = input side)",
               ylabel=("rms" if "rms" in what else "gradient norm") + " (log scale)")  # fmt: skip
    preln = data[(data["variant"] == "preln") & (data["what"] == "stream rms")]
    if len(preln) and config is not None:  # Xiong et al. 2020: linear growth of the square
        growth = theory.preln_stream_growth(config["activation"], config["init"], config["width"])
        blocks = np.arange(int(preln["block"].max()) + 1)
        start = float(np.square(preln[preln["block"] == 0]["value"]).mean())
        axes[0].plot(blocks, np.sqrt(start + growth * blocks), color="black", ls=":",
                     label=f"Pre-LN theory: +{growth:.3g} mean square per block")  # fmt: skip
        axes[0].legend(fontsize=8)
    residual = data[(data["variant"] == "residual") & (data["what"] == "stream rms")]
    if len(residual) and config is not None:  # the block-by-block variance map
        count = int(residual["block"].max()) + 1
        start = float(np.square(residual[residual["block"] == 0]["value"]).mean())
        ms = theory.residual_stream(
            config["activation"], config["init"], config["width"], start, count
        )
        axes[0].plot(np.arange(count), np.sqrt(ms), color="grey", ls=":", label="residual theory")
        axes[0].legend(fontsize=8)
    fig.suptitle("Signal propagation at init, deepest runs of each variant (bands: seeds)")
    fig.tight_layout()
    return fig


def activations_by_variant(
    frame: pd.DataFrame, runs: Any, palette: dict[str, Any] | None = None
) -> plt.Figure:
    """Activation rms per activation layer at init and after training, and the zero and
    saturated fractions after training, deepest run of each variant."""
    runs = _runs(runs)
    palette = palette or variant_palette()
    rows = []
    for r in deepest_runs(runs, every_seed=True).itertuples():
        run = _run_rows(frame, r.variant, r.depth, r.seed)
        run = run[run["kind"] == Kind.ACTIVATION]
        acts = run[run["layer"].str.endswith(".act")]
        if acts.empty:
            continue
        for phase, step in (("init", acts["step"].min()), ("end", acts["step"].max())):
            at = acts[acts["step"] == step]
            order = {name: i for i, name in enumerate(dict.fromkeys(at["layer"]))}
            rows.append(at.assign(index=at["layer"].map(order), variant=r.variant, phase=phase))
    if not rows:
        raise PlotError("no activation layers (*.act) in the sweep's runs")
    data = pd.concat(rows, ignore_index=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, phase in ((axes[0], "init"), (axes[1], "end")):
        rms = data[(data["stat"] == Stat.RMS) & (data["phase"] == phase) & (data["value"] > 0)]
        sns.lineplot(data=rms, x="index", y="value", hue="variant", palette=palette, ax=ax)
        ax.set(yscale="log", xlabel="activation layer (0 = input side)", ylabel="rms (log scale)",
               title="Activation rms per layer, " + _when(phase))  # fmt: skip
    sub = data[(data["stat"].isin(["zero_frac", "saturated_frac"])) & (data["phase"] == "end")]
    if len(sub):
        sns.lineplot(data=sub, x="index", y="value", hue="variant", style="stat",
                     palette=palette, ax=axes[2])  # fmt: skip
    axes[2].set(ylim=(-0.02, 1.02), xlabel="activation layer (0 = input side)",
                ylabel="fraction of outputs",
                title="Zero (ReLU: ~0.5 normal) / saturated fraction after training")  # fmt: skip
    fig.tight_layout()
    return fig


def accuracy_and_loss(
    runs: Any, loss: pd.DataFrame, palette: dict[str, Any] | None = None
) -> plt.Figure:
    """Test accuracy against depth per variant, and the deepest runs' training loss."""
    runs = _runs(runs)
    palette = palette or variant_palette()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    sns.lineplot(data=runs, x="depth", y="test_acc", hue="variant", palette=palette, marker="o",
                 ax=axes[0])  # fmt: skip
    axes[0].set(xscale="log", ylim=(0, 1), title="Test accuracy against depth",
                xlabel="depth (log scale)", ylabel="test accuracy")  # fmt: skip
    keep = loss.merge(
        deepest_runs(runs, every_seed=True)[["variant", "depth", "seed"]],
        on=["variant", "depth", "seed"],
    )
    keep = keep[np.isfinite(keep["loss"])]
    if len(keep):
        keep = keep.assign(
            smooth=keep.groupby(["variant", "seed"])["loss"].transform(
                lambda s: s.rolling(10, min_periods=1).mean()
            )
        )
        sns.lineplot(data=keep, x="step", y="smooth", hue="variant", palette=palette, ax=axes[1])
    axes[1].set(
        yscale="log",  # a diverged run's loss (1e4) would flatten every other curve
        title="Training loss of the deepest run (10-step mean; diverged runs end early)",
        xlabel="step",
        ylabel="cross-entropy loss (log scale)",
    )
    fig.tight_layout()
    return fig
