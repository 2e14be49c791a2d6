"""Figures of `gradscope reproduce`: measured accuracy against published, gradient flow,
loss, weights and sparsity, and the clipping experiment. Each takes a Reproduction and
returns its Figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from gradscope import frame as fr
from gradscope.plot.common import PlotError
from gradscope.schema import Kind, Stat

if TYPE_CHECKING:
    from gradscope.lab.reproduce import Reproduction


def accuracy_vs_published(result: Reproduction) -> plt.Figure:
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
    return fig


def gradient_flow(result: Reproduction) -> plt.Figure:
    frame = result.frame
    if frame.empty:
        raise PlotError("no recorded frame in this reproduction")
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
    return fig


def loss_curves(result: Reproduction) -> plt.Figure:
    losses = result.extra.get("losses", pd.DataFrame())
    if losses.empty:
        raise PlotError("no losses in this reproduction")
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
    return fig


def weights_and_sparsity(result: Reproduction) -> plt.Figure:
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
    return fig


def clipping_effect(result: Reproduction) -> plt.Figure:
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
    return fig
