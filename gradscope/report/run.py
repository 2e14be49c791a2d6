"""The run report: what is wrong first, then gradient flow over steps and depth, updates,
activations, non-finite events and logged scalars of one recorded run.

Readable at any size: with many weight matrices (a 100-block stack, a GPT-2) the layer rows
are grouped by block (the total norm of the block's matrices), so a figure keeps about
`MAX_ROWS` rows whatever the model.
"""

from __future__ import annotations

import html
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gradscope import frame as fr  # noqa: E402
from gradscope.analysis.render import headline  # noqa: E402
from gradscope.diagnose import UPDATE_RATIO_HIGH, UPDATE_RATIO_LOW  # noqa: E402
from gradscope.report.html import (  # noqa: E402
    Section,
    figure_html,
    log_norm_heatmap,
    render_html,
    table_html,
)
from gradscope.report.tried import tried_section  # noqa: E402
from gradscope.runs import Run  # noqa: E402
from gradscope.schema import Kind, Stat  # noqa: E402

MAX_ROWS = 48  # layer rows in a figure before they are grouped by block


def layer_groups(frame: pd.DataFrame, layers: list[str]) -> dict[str, str]:
    """Each layer's row in a figure: itself, or its block where there are many layers."""
    if len(layers) <= MAX_ROWS:
        return {name: name for name in layers}
    blocks = [b.partition("[")[0] for b in fr.stream_layers(frame)]
    groups = {}
    for name in layers:
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        groups[name] = block or name.rsplit(".", 2)[0]
    return groups


def _grouped_norms(frame: pd.DataFrame, layers: list[str]) -> pd.DataFrame:
    """Gradient norm per row (layer or block: the root of the sum of squares) x step."""
    groups = layer_groups(frame, layers)
    grads = fr.select(frame, Kind.PARAM_GRAD, Stat.NORM, layers=layers)
    grads = grads.assign(group=grads["layer"].map(groups), sq=np.square(grads["value"]))
    wide = grads.pivot_table(index="group", columns="step", values="sq", aggfunc="sum")
    order = list(dict.fromkeys(groups[name] for name in layers))
    return np.sqrt(wide.reindex(order))


def _fig_heatmap(frame: pd.DataFrame, layers: list[str]) -> str:
    wide = _grouped_norms(frame, layers)
    if wide.empty:
        return ""
    rows = len(wide)
    fig, ax = plt.subplots(figsize=(11, max(3.0, min(7.0, 0.2 * rows + 1.5))))
    log_norm_heatmap(ax, wide, y_labels=40, x_labels=12)
    grouped = rows < len(layers)
    ax.set(
        title="Gradient norm per " + ("block" if grouped else "weight matrix") + " over steps",
        xlabel="step",
        ylabel="block (input side at top)" if grouped else "weight matrix (input side at top)",
    )
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return figure_html(fig, "layer by step heatmap of gradient norm")


def _fig_profiles(frame: pd.DataFrame) -> str:
    steps = sorted(fr.select(frame, Kind.PARAM_GRAD, Stat.NORM)["step"].unique())
    if not steps:
        return ""
    picks = list(dict.fromkeys([steps[0], steps[len(steps) // 2], steps[-1]]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for step in picks:
        prof = fr.gradient_profile(frame, int(step))
        norms = prof["norm"].to_numpy()
        label = f"step {step}: {fr.decay_slope(norms):.3g} decades/layer"
        axes[0].plot(prof["index"], np.where(norms > 0, norms, np.nan), marker=".", label=label)
    axes[0].set(
        yscale="log",
        title="Gradient norm against depth (slope: decades lost per layer)",
        xlabel="weight matrix (0 = input side)",
        ylabel="gradient norm (log scale)",
    )
    axes[0].legend(fontsize=8)
    layers = fr.weight_matrices(frame)
    ratios = fr.select(frame, Kind.UPDATE, Stat.RATIO, layers=layers)
    index = {name: i for i, name in enumerate(layers)}
    for step in picks:
        at = ratios[ratios["step"] == step]
        x = at["layer"].map(index).to_numpy()
        y = at["value"].to_numpy()
        order = np.argsort(x)
        axes[1].plot(x[order], np.where(y > 0, y, np.nan)[order], marker=".", label=f"step {step}")
    axes[1].axhspan(UPDATE_RATIO_LOW, UPDATE_RATIO_HIGH, color="#1b7a1b", alpha=0.08)
    axes[1].set(
        yscale="log",
        title="Update / weight norm (green: the healthy band)",
        xlabel="weight matrix (0 = input side)",
        ylabel="update ratio (log scale)",
    )
    if len(ratios):
        axes[1].legend(fontsize=8)
    else:
        axes[1].text(0.5, 0.5, "no updates recorded (no optimizer)", ha="center",
                     transform=axes[1].transAxes)  # fmt: skip
    fig.tight_layout()
    return figure_html(fig, "gradient profile over depth and update ratios")


def _fig_activations(frame: pd.DataFrame) -> str:
    acts = fr.select(frame, Kind.ACTIVATION)
    if acts.empty:
        return ""
    stream = set(fr.stream_layers(frame))
    steps = sorted(acts["step"].unique())
    picks = list(dict.fromkeys([steps[0], steps[-1]]))
    zeros = acts[acts["stat"] == Stat.ZERO_FRAC]
    sparse = set(zeros.loc[zeros["value"] > 0.01, "layer"]) | set(
        acts.loc[acts["stat"] == Stat.SATURATED_FRAC, "layer"]
    )
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for step in picks:
        rms = acts[(acts["step"] == step) & (acts["stat"] == Stat.RMS)]
        rms = rms[~rms["layer"].isin(stream)]
        axes[0].plot(
            range(len(rms)), rms["value"].where(rms["value"] > 0), ".", label=f"step {step}"
        )
        streams = acts[(acts["step"] == step) & (acts["stat"] == Stat.RMS)]
        streams = streams[streams["layer"].isin(stream)]
        if len(streams):
            axes[0].plot(
                np.linspace(0, max(len(rms) - 1, 1), len(streams)),
                streams["value"],
                "-",
                label=f"residual stream, step {step}",
            )
        for stat, marker in ((Stat.ZERO_FRAC, "o"), (Stat.SATURATED_FRAC, "x")):
            part = acts[(acts["step"] == step) & (acts["stat"] == stat)]
            # exact zeros only mean something for ReLU-like outputs: layers that have some
            part = part[~part["layer"].isin(stream) & part["layer"].isin(sparse)]
            if len(part):
                axes[1].plot(
                    range(len(part)), part["value"], marker, ms=3, label=f"{stat}, step {step}"
                )
    axes[0].set(
        yscale="log",
        title="Output rms per module (forward order)",
        xlabel="module (0 = input side)",
        ylabel="rms (log scale)",
    )
    axes[0].legend(fontsize=8)
    axes[1].set(
        ylim=(-0.02, 1.02),
        title="Dead (exactly zero) and saturated output fractions",
        xlabel="ReLU-like or bounded activation (0 = input side)",
        ylabel="fraction of outputs",
    )
    if axes[1].lines:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    return figure_html(fig, "activation rms and dead or saturated fractions")


def _fig_scalars(frame: pd.DataFrame) -> str:
    scalars = fr.select(frame, Kind.SCALAR)
    if scalars.empty:
        return ""
    names = list(dict.fromkeys(scalars["stat"]))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        series = scalars[scalars["stat"] == name].sort_values("step")
        ax.plot(series["step"], series["value"], marker=".")
        positive = (series["value"] > 0).all()
        ax.set(yscale="log" if positive else "linear", title=name, xlabel="step")
    fig.tight_layout()
    return figure_html(fig, "logged scalars over steps")


def _verdicts_html(run: Run) -> str:
    # one headline per root cause (gradscope.analysis.render), what to do, and the symptoms
    # it explains
    parts = []
    for v in run.verdicts:
        more = (
            f" <small>(also explains: {html.escape(', '.join(v.explains))})</small>"
            if v.explains
            else ""
        )
        parts.append(
            f'<p class="verdict sev-{html.escape(v.severity)}">{html.escape(headline(v))}. '
            f"{html.escape(v.suggestion)}{more}</p>"
        )
    return "\n".join(parts) or "<p>No verdicts: nothing was recorded.</p>"


def _nonfinite_html(frame: pd.DataFrame) -> str:
    origins = fr.select(frame, Kind.NONFINITE_ORIGIN)
    if origins.empty:
        return "<p>No inf or NaN in any recorded output, gradient or parameter.</p>"
    table = origins.rename(columns={"stat": "phase", "layer": "first non-finite in"})
    return table_html(table[["step", "phase", "first non-finite in"]].head(50))


def render_run_report(run: Run, trial: Any = None) -> Any:
    """Writes report.html into the run folder; returns its path. With `trial` (a
    gradscope.remedies.Trial), a "Tried" section after the verdicts."""
    frame, info = run.frame, run.info
    model, steps = info.get("model", {}), info.get("steps", {})
    subtitle = (
        f"{model.get('class', 'model')} with {model.get('parameters', '?'):,} parameters; "
        f"{steps.get('recorded', 0)} recorded steps ({steps.get('first', '-')} to "
        f"{steps.get('last', '-')}); optimizer {info.get('recorder', {}).get('optimizer')}; "
        f"torch {info.get('versions', {}).get('torch')}"
    )
    layers = fr.weight_matrices(frame)
    grouped = len(set(layer_groups(frame, layers).values())) < len(layers)
    sections = [
        Section(
            "What is wrong",
            "Verdicts over the whole recording, worst first, each with the steps it holds over.",
            [_verdicts_html(run)],
        ),
        *([] if trial is None else [tried_section(trial)]),
        Section(
            "Gradient norm over training",
            "Each row a weight matrix"
            + (" (grouped by block: the norm over the block's matrices)" if grouped else "")
            + "; a colour fading toward the top is gradient vanishing toward the input.",
            [_fig_heatmap(frame, layers)],
        ),
        Section(
            "Gradient profile and updates",
            "At the first, a middle and the last recorded step. Plain ReLU stacks under "
            "PyTorch's default init lose about 0.39 decades per layer.",
            [_fig_profiles(frame)],
        ),
        Section("Activations", "", [_fig_activations(frame)]),
        Section("Non-finite values", "", [_nonfinite_html(frame)]),
        Section("Logged scalars", "", [_fig_scalars(frame)]),
        Section("Run", "", [f"<pre>{html.escape(json.dumps(info, indent=2))}</pre>"]),
    ]
    page = render_html(f"gradscope run: {info.get('name', run.path.name)}", subtitle, sections)
    path = run.path / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
