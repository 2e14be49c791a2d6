"""The depth-sweep report: gradient profiles, ratios, slopes, heatmaps, accuracy, verdicts."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from gradscope import frame as fr  # noqa: E402
from gradscope import theory  # noqa: E402
from gradscope.analysis.render import headline  # noqa: E402
from gradscope.lab.models import Variant  # noqa: E402
from gradscope.lab.sweep import load_results  # noqa: E402
from gradscope.report.html import (  # noqa: E402
    Section,
    figure_html,
    log_norm_heatmap,
    render_html,
    table_html,
)
from gradscope.report.summary import story, story_html, trainability_map  # noqa: E402
from gradscope.schema import Kind, Stat  # noqa: E402
from gradscope.verdict import Verdict  # noqa: E402


def variant_palette() -> dict[str, Any]:
    """The same colour for a variant in every figure."""
    colors = sns.color_palette("colorblind", len(Variant))
    return {v.value: colors[i] for i, v in enumerate(Variant)}


def _grad_profiles(frame: pd.DataFrame) -> pd.DataFrame:
    """Weight-matrix gradient norms at the first and last recorded step of every run."""
    out = []
    for (variant, depth, seed), run in frame.groupby(["variant", "depth", "seed"], sort=False):
        steps = fr.select(run, Kind.PARAM_GRAD)["step"]
        if steps.empty:
            continue
        for phase, step in (("at init (step 0)", steps.min()), ("after training", steps.max())):
            prof = fr.gradient_profile(run, int(step))
            prof["variant"], prof["depth"], prof["seed"], prof["phase"] = (
                variant,
                depth,
                seed,
                phase,
            )
            out.append(prof)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def _fig_profiles(profiles: pd.DataFrame, variants: list[str]) -> str:
    data = profiles.copy()  # several seeds: the band around each line
    data["norm"] = data["norm"].where(data["norm"] > 0)
    grid = sns.relplot(
        data=data,
        x="index",
        y="norm",
        hue="depth",
        col="variant",
        row="phase",
        col_order=variants,
        kind="line",
        palette="viridis",
        height=2.8,
        aspect=1.1,
        facet_kws={"sharex": False},
        legend="full",
    )
    grid.set(yscale="log")
    grid.set_axis_labels("weight matrix (0 = input side)", "gradient norm (log scale)")
    grid.set_titles("{col_name} | {row_name}")
    grid.figure.suptitle("Gradient norm per layer, one line per depth", y=1.02)
    return figure_html(grid.figure, "gradient norm against layer index per variant and depth")


def _fig_ratio_and_slope(runs: pd.DataFrame, palette: dict[str, Any]) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, col, title in (
        (axes[0], "grad_ratio_init", "First/last gradient ratio at init"),
        (axes[1], "grad_ratio_end", "First/last gradient ratio after training"),
    ):
        data = runs[runs[col] > 0]
        sns.lineplot(data=data, x="depth", y=col, hue="variant", palette=palette, marker="o", ax=ax)
        ax.set(
            xscale="log",
            yscale="log",
            title=title,
            xlabel="depth (log scale)",
            ylabel="first/last gradient norm (log scale)",
        )
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    sns.lineplot(
        data=runs,
        x="depth",
        y="grad_decay_init",
        hue="variant",
        palette=palette,
        marker="o",
        ax=axes[2],
    )
    axes[2].set(
        xscale="log",
        title="Decay slope at init",
        xlabel="depth (log scale)",
        ylabel="decades lost per layer (>0 vanishing)",
    )
    axes[2].axhline(0.0, color="grey", lw=0.8, ls="--")
    theory = runs["grad_decay_theory"] if "grad_decay_theory" in runs else pd.Series(dtype=float)
    predicted = theory[runs["variant"] == "plain"].dropna()
    if len(predicted):  # the mean-field prediction for the plain stack (gradscope.theory)
        axes[2].axhline(
            float(predicted.iloc[0]),
            color=palette.get("plain", "black"),
            lw=1.2,
            ls=":",
            label=f"plain, theory ({float(predicted.iloc[0]):.3g})",
        )
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    return figure_html(fig, "gradient ratio and decay slope against depth")


def _run_rows(frame: pd.DataFrame, variant: str, depth: int, seed: int) -> pd.DataFrame:
    """The rows of one run of the sweep."""
    return frame[
        (frame["variant"] == variant) & (frame["depth"] == depth) & (frame["seed"] == seed)
    ]


def _fig_heatmaps(frame: pd.DataFrame, runs: pd.DataFrame, variants: list[str]) -> str:
    deepest = runs.sort_values("depth").groupby("variant").tail(1).set_index("variant")
    present = [v for v in variants if v in deepest.index]
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 4.2), squeeze=False)
    for ax, variant in zip(axes[0], present, strict=True):
        d, s = int(deepest.loc[variant, "depth"]), int(deepest.loc[variant, "seed"])
        run = _run_rows(frame, variant, d, s)
        layers = fr.weight_matrices(run)
        grads = fr.select(run, Kind.PARAM_GRAD, Stat.NORM, layers=layers)
        wide = grads.pivot_table(index="layer", columns="step", values="value", aggfunc="first")
        wide = wide.reindex(layers)
        log_norm_heatmap(ax, wide, y_labels=10, x_labels=6)
        ax.set(title=f"{variant}, depth {d}", xlabel="step", ylabel="weight matrix")
        ax.tick_params(axis="y", labelsize=6)
    fig.suptitle("Gradient norm, layer x step, deepest run of each variant (log10 colour)")
    fig.tight_layout()
    return figure_html(fig, "layer by step heatmap of gradient norm")


def _deepest(runs: pd.DataFrame) -> pd.DataFrame:
    """Every seed's run at each variant's largest depth."""
    return runs[runs["depth"] == runs.groupby("variant")["depth"].transform("max")]


def _fig_signal_propagation(
    frame: pd.DataFrame,
    runs: pd.DataFrame,
    palette: dict[str, Any],
    config: dict[str, Any] | None = None,
) -> str:
    """Brock et al. (2021)'s signal propagation plots at init, deepest run of each variant:
    per block, the stream's rms, the residual branch's rms and the gradient at the block."""
    rows = []
    for r in _deepest(runs).itertuples():
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
        return ""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, what in zip(axes, ("stream rms", "branch rms", "gradient at the block"), strict=True):
        part = data[(data["what"] == what) & (data["value"] > 0)]
        if len(part):
            sns.lineplot(data=part, x="block", y="value", hue="variant", palette=palette, ax=ax)
        ax.set(yscale="log", title=f"{what.capitalize()} at init", xlabel="block (0 = input side)")
    preln = data[(data["variant"] == "preln") & (data["what"] == "stream rms")]
    if len(preln) and config is not None:  # Xiong et al. 2020: linear growth of the square
        growth = theory.preln_stream_growth(config["activation"], config["init"], config["width"])
        blocks = np.arange(int(preln["block"].max()) + 1)
        start = float(np.square(preln[preln["block"] == 0]["value"]).mean())
        axes[0].plot(
            blocks,
            np.sqrt(start + growth * blocks),
            color="black",
            ls=":",
            label=f"Pre-LN theory: +{growth:.3g} mean square per block",
        )
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
    return figure_html(fig, "signal propagation at init: stream, branch and gradient per block")


def _fig_activations(frame: pd.DataFrame, runs: pd.DataFrame, palette: dict[str, Any]) -> str:
    rows = []
    for r in _deepest(runs).itertuples():
        run = _run_rows(frame, r.variant, r.depth, r.seed)
        run = run[run["kind"] == Kind.ACTIVATION]
        acts = run[run["layer"].str.endswith(".act")]
        for phase, step in (("init", acts["step"].min()), ("end", acts["step"].max())):
            at = acts[acts["step"] == step]
            order = {name: i for i, name in enumerate(dict.fromkeys(at["layer"]))}
            at = at.assign(index=at["layer"].map(order), variant=r.variant, phase=phase)
            rows.append(at)
    if not rows:
        return ""
    data = pd.concat(rows, ignore_index=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, phase in ((axes[0], "init"), (axes[1], "end")):
        rms = data[(data["stat"] == Stat.RMS) & (data["phase"] == phase) & (data["value"] > 0)]
        sns.lineplot(data=rms, x="index", y="value", hue="variant", palette=palette, ax=ax)
        ax.set(
            yscale="log",
            title=f"Activation rms per layer, {'at init' if phase == 'init' else 'after training'}",
            xlabel="activation layer (0 = input side)",
            ylabel="rms (log scale)",
        )
    sub = data[(data["stat"].isin(["zero_frac", "saturated_frac"])) & (data["phase"] == "end")]
    sns.lineplot(
        data=sub, x="index", y="value", hue="variant", style="stat", palette=palette, ax=axes[2]
    )
    axes[2].set(
        ylim=(-0.02, 1.02),
        title="Dead (zero) / saturated fraction after training",
        xlabel="activation layer (0 = input side)",
        ylabel="fraction of outputs",
    )
    fig.tight_layout()
    return figure_html(fig, "activation statistics against layer")


def _fig_accuracy(
    runs: pd.DataFrame, loss: pd.DataFrame, palette: dict[str, Any], variants: list[str]
) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    sns.lineplot(
        data=runs, x="depth", y="test_acc", hue="variant", palette=palette, marker="o", ax=axes[0]
    )
    axes[0].set(
        xscale="log",
        ylim=(0, 1),
        title="Test accuracy against depth",
        xlabel="depth (log scale)",
        ylabel="test accuracy",
    )
    keep = loss.merge(_deepest(runs)[["variant", "depth", "seed"]], on=["variant", "depth", "seed"])
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
    return figure_html(fig, "test accuracy against depth and loss curves")


def _verdict_html(details: dict[str, Any], runs: pd.DataFrame) -> str:
    parts = []
    deepest = runs.sort_values("depth").groupby("variant").tail(1)
    for r in deepest.itertuples():
        run_id = f"{r.variant}-d{r.depth}-s{r.seed}"
        for phase in ("init", "end"):
            for saved in details.get(run_id, {}).get(phase, []):
                v = Verdict(**saved)  # one headline per root cause (analysis.render)
                parts.append(
                    f'<p class="verdict sev-{html.escape(v.severity)}"><b>{html.escape(run_id)}, '
                    f"{phase}</b> {html.escape(headline(v))}. {html.escape(v.suggestion)}</p>"
                )
    return "\n".join(parts)


def render_sweep_report(
    out: Path, results: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None = None
) -> Path:
    """Renders report.html in a sweep folder from its saved runs; returns its path.

    `results` is what `load_results(out)` returns, for callers that have loaded it already.
    """
    frame, runs, loss = results if results is not None else load_results(out)
    config = json.loads((out / "config.json").read_text())
    details = {}
    for p in (out / "runs").glob("*.json"):
        details[p.name[: -len(".json")]] = json.loads(p.read_text()).get("details", {})
    palette = variant_palette()
    variants = [v for v in config["variants"] if v in set(runs["variant"])]
    planned = len(config["variants"]) * len(config["depths"]) * len(config["seeds"])
    subtitle = (
        f"{len(runs)} of {planned} runs finished; dataset {config['dataset']}, "
        f"optimizer {config['optimizer']}, width {config['width']}, activation "
        f"{config['activation']}, init {config['init']}, {config['steps']} steps of batch "
        f"{config['batch_size']}, recorded every {config['every']} steps."
    )
    sections = []
    if len(runs):
        sections.append(
            Section(
                "The answer",
                "",
                [trainability_map(runs, variants), story_html(story(runs, config))],
            )
        )
    if len(runs) and len(frame):
        profiles = _grad_profiles(frame)
        sections += [
            Section(
                "1. Gradient norm against layer",
                "Each line is one depth. A line falling toward layer 0 is vanishing; rising, "
                "exploding. Plain stacks lose about 0.39 decades per layer under PyTorch's "
                "default init.",
                [_fig_profiles(profiles, variants)],
            ),
            Section(
                "2-3. First/last ratio and decay slope against depth",
                "",
                [_fig_ratio_and_slope(runs, palette)],
            ),
            Section("4. Gradient norm over training", "", [_fig_heatmaps(frame, runs, variants)]),
            Section(
                "5. Activations",
                "Rms of each activation output at init and after training (what separates "
                "the variants), and the fraction of dead (exactly zero) or saturated outputs.",
                [_fig_activations(frame, runs, palette)],
            ),
            Section("6. Accuracy and loss", "", [_fig_accuracy(runs, loss, palette, variants)]),
            Section(
                "Signal propagation at init",
                "Per block of the deepest run: the residual stream's rms, the rms of what "
                "each block adds (its branch), and the gradient norm at the block's output. "
                "Pre-LN streams grow with depth while their branches stay put; an "
                "unnormalized residual stream grows until it overflows.",
                [_fig_signal_propagation(frame, runs, palette, config)],
            ),
        ]
    sections += [
        Section("7. Verdicts (deepest run of each variant)", "", [_verdict_html(details, runs)]),
        Section("Runs", "", [table_html(runs)]),
        Section("Configuration", "", [f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>"]),
    ]
    page = render_html("gradscope depth sweep", subtitle, sections)
    path = out / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
