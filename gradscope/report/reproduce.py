"""Reports for `gradscope reproduce`: measured against published, and the gradients behind it."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from gradscope import frame as fr  # noqa: E402
from gradscope.lab.reproduce import Reproduction  # noqa: E402
from gradscope.report.html import Section, figure_html, render_html, table_html  # noqa: E402
from gradscope.schema import Kind, Stat  # noqa: E402

INTRO = {
    "journey": "The teaching text's five-step journey on MNIST, each configuration over several "
    "seeds. A row is 'reproduced' when the published accuracy lies within two combined "
    "standard errors (seed spread and the binomial error of the 10,000-image test set).",
    "dropout": "Training on only 1,000 examples, with and without dropout 0.2: the "
    "generalization gap is train accuracy minus test accuracy.",
    "regularization": "L2 weight decay shrinks weights; an L1 penalty pushes them toward zero. "
    "Exact zeros need the L1 proximal step: the penalty gradient alone leaves weights hovering "
    "around zero.",
    "clipping": "An unnormalized residual stack whose gradients grow with depth, trained with "
    "and without clipping the total gradient norm.",
}


def _accuracy_figure(result: Reproduction) -> str:
    runs, table = result.runs, result.table
    splits = ["test"] + (["train"] if "train_published" in table else [])
    fig, axes = plt.subplots(
        1, len(splits), figsize=(6.5 * len(splits), 0.6 * len(table) + 2.2), squeeze=False
    )
    for ax, split in zip(axes[0], splits, strict=True):
        sns.stripplot(
            data=runs,
            y="experiment",
            x=f"{split}_acc",
            ax=ax,
            color="tab:blue",
            size=6,
            jitter=False,
            label="measured (one dot per seed)",
        )
        ax.errorbar(
            table[f"{split}_mean"],
            range(len(table)),
            xerr=table[f"{split}_std"],
            fmt="s",
            color="black",
            capsize=4,
            label="mean +- std",
        )
        if f"{split}_published" in table:
            ax.scatter(
                table[f"{split}_published"],
                range(len(table)),
                marker="x",
                s=80,
                color="tab:red",
                zorder=5,
                label="published",
            )
        ax.set(
            title=f"{split.capitalize()} accuracy: measured against published",
            xlabel=f"{split} accuracy",
            ylabel="",
        )
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=False))
        ax.legend(unique.values(), unique.keys(), loc="lower left", fontsize=8)
    fig.tight_layout()
    return figure_html(fig, "measured accuracy against published")


def _gradient_figure(result: Reproduction) -> str:
    frame = result.frame
    if frame.empty:
        return ""
    seed = frame["seed"].min()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for exp, run in frame[frame["seed"] == seed].groupby("experiment", sort=False):
        prof = fr.gradient_profile(run, int(run["step"].min()))
        axes[0].plot(prof["index"], prof["norm"], marker="o", label=exp)
        ratios = fr.select(run, Kind.UPDATE, Stat.RATIO, layers=fr.weight_matrices(run))
        med = ratios.groupby("step")["value"].median()
        axes[1].plot(med.index, med.to_numpy(), label=exp)
    axes[0].set(
        yscale="log",
        title="Gradient norm per weight matrix at step 0",
        xlabel="weight matrix (0 = input side)",
        ylabel="gradient norm (log scale)",
    )
    axes[1].set(
        yscale="log",
        title="Median update/weight ratio over training",
        xlabel="step",
        ylabel="update norm / weight norm (log scale)",
    )
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_html(fig, "per-layer gradient norms and update ratios")


def _loss_figure(result: Reproduction) -> str:
    losses = result.extra.get("losses", pd.DataFrame())
    if losses.empty:
        return ""
    data = losses[losses["seed"] == losses["seed"].min()].copy()
    data["loss"] = data["loss"].where(np.isfinite(data["loss"]))
    data["smooth"] = data.groupby("experiment")["loss"].transform(
        lambda s: s.rolling(20, min_periods=1).mean()
    )
    fig, ax = plt.subplots(figsize=(8, 4))
    sns.lineplot(
        data=data,
        x="step",
        y="smooth",
        hue="experiment",
        hue_order=list(result.table["experiment"]),
        ax=ax,
    )
    ax.set(
        yscale="log",
        title="Training loss (20-step mean, first seed)",
        xlabel="step",
        ylabel="cross-entropy (log scale)",
    )
    return figure_html(fig, "training loss curves")


def _regularization_figure(result: Reproduction) -> str:
    runs = result.runs
    cols = [
        c
        for c in runs.columns
        if c.endswith(":exact_zero_frac") or c.endswith(":near_zero_frac") or c.endswith(":norm")
    ]
    long = runs.melt(id_vars=["experiment", "seed"], value_vars=cols)
    long[["layer", "stat"]] = long["variable"].str.split(":", expand=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, stat, title in zip(
        axes,
        ["norm", "exact_zero_frac", "near_zero_frac"],
        ["Weight norm", "Fraction of exactly zero weights", "Fraction of |w| < 1e-3"],
        strict=True,
    ):
        sns.barplot(data=long[long["stat"] == stat], x="layer", y="value", hue="experiment", ax=ax)
        ax.set(title=f"{title} per layer", xlabel="weight matrix", ylabel=title.lower())
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_html(fig, "weight norms and sparsity per layer")


def _clipping_figure(result: Reproduction) -> str:
    losses = result.extra["losses"]
    updates = result.extra["updates"]
    seed = losses["seed"].min()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    data = losses[losses["seed"] == seed].copy()
    for col in ("preclip_norm", "loss"):
        data[col] = data[col].where(np.isfinite(data[col]))
    order = list(result.table["experiment"])
    sns.lineplot(
        data=data, x="step", y="preclip_norm", hue="experiment", hue_order=order, ax=axes[0]
    )
    axes[0].set(
        yscale="log",
        title="Total gradient norm before clipping",
        xlabel="step",
        ylabel="norm (log scale)",
    )
    sns.lineplot(data=data, x="step", y="loss", hue="experiment", hue_order=order, ax=axes[1])
    axes[1].set(
        yscale="log", title="Training loss", xlabel="step", ylabel="cross-entropy (log scale)"
    )
    up = updates[updates["seed"] == seed]
    sns.lineplot(data=up, x="step", y="update_norm", hue="experiment", hue_order=order, ax=axes[2])
    axes[2].axhline(
        result.settings["update_bound"], color="grey", ls="--", label="bound lr*clip/(1-momentum)"
    )
    axes[2].set(
        yscale="log",
        title="Applied update norm (all parameters)",
        xlabel="step",
        ylabel="norm (log scale)",
    )
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return figure_html(fig, "clipping: gradient norm, loss, update norm")


def render_reproduction(result: Reproduction, out: Path) -> Path:
    """Writes report.html for one reproduction into out; returns its path."""
    sections = [Section("Result", INTRO.get(result.name, ""), [table_html(result.table)])]
    if result.name == "clipping":
        sections.append(
            Section("Gradient norm, loss and update over time", "", [_clipping_figure(result)])
        )
    else:
        sections.append(Section("Accuracy", "", [_accuracy_figure(result)]))
    if "by_epochs" in result.extra:
        sections.append(
            Section(
                "The gap against training length",
                "The same comparison trained for "
                "longer: how much dropout narrows the gap depends on when training stops.",
                [table_html(result.extra["by_epochs"])],
            )
        )
    if result.name == "regularization":
        sections.append(Section("Weights", "", [_regularization_figure(result)]))
    if result.name != "clipping":
        sections.append(
            Section(
                "Gradient flow", "Recorded with gradscope's Recorder.", [_gradient_figure(result)]
            )
        )
        sections.append(Section("Loss", "", [_loss_figure(result)]))
    sections += [
        Section(
            "Runs (one row per seed)",
            "",
            [table_html(result.runs[[c for c in result.runs.columns if ":" not in c]])],
        ),
        Section(
            "Settings",
            "Chosen before running, not tuned toward the published numbers.",
            [f"<pre>{html.escape(json.dumps(result.settings, indent=2, default=str))}</pre>"],
        ),
    ]
    page = render_html(
        f"gradscope reproduce {result.name}", f"dataset {result.settings.get('dataset')}", sections
    )
    path = out / "report.html"
    path.write_text(page)
    return path
