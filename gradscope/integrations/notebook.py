"""What Jupyter shows for a Recorder, a Run, a list of verdicts and a sweep's results: the
headline numbers, the worst verdicts and one small figure (`_repr_html_` delegates here).

Example:
    >>> from gradscope.verdict import VerdictList
    >>> from gradscope import Verdict
    >>> "healthy" in VerdictList([Verdict("healthy", "ok", "fine", "")])._repr_html_()
    True
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import pandas as pd

from gradscope import frame as fr
from gradscope.schema import TOTAL, Kind, Stat
from gradscope.verdict import SEVERITIES, Verdict

SHOWN_VERDICTS = 3  # the worst verdicts a summary lists
COLORS = {"ok": "#1b7a1b", "info": "#4a6fa5", "warning": "#a15c00", "error": "#b00020"}


def verdicts_html(verdicts: list[Verdict], shown: int = SHOWN_VERDICTS) -> str:
    """The worst `shown` verdicts, one coloured line each, and how many more there are."""
    worst = sorted(verdicts, key=lambda v: -SEVERITIES.index(v.severity))
    lines = [
        f'<li style="color:{COLORS.get(v.severity, "#222")}">[{html.escape(v.severity)}] '
        f"<b>{html.escape(v.id)}</b>: {html.escape(v.message)}</li>"
        for v in worst[:shown]
    ]
    if len(worst) > shown:
        lines.append(f"<li>and {len(worst) - shown} more</li>")
    return (
        "<ul style='margin:0.2em 0'>" + "".join(lines) + "</ul>" if lines else "<i>no verdicts</i>"
    )


def headline_numbers(frame: pd.DataFrame) -> dict[str, str]:
    """Steps, layers, and at the last recorded step the total gradient norm, first/last
    ratio, decay slope and loss, as short text."""
    if frame.empty:
        return {"recorded steps": "0"}
    steps = sorted(frame["step"].unique())
    last = int(steps[-1])
    out = {
        "recorded steps": f"{len(steps)} ({steps[0]} to {last})",
        "weight matrices": str(len(fr.weight_matrices(frame))),
    }
    total = fr.select(frame, Kind.PARAM_GRAD, Stat.NORM, step=last, layers=[TOTAL])
    if len(total):
        out["gradient norm"] = f"{float(total['value'].iloc[0]):.3g}"
    norms = fr.gradient_profile(frame, last)["norm"].to_numpy()
    if len(norms) >= 2:
        out["first/last ratio"] = f"{fr.first_last_ratio(norms):.3g}"
        out["decades lost per layer"] = f"{fr.decay_slope(norms):.3g}"
    loss = fr.select(frame, Kind.SCALAR, Stat.LOSS, step=last)
    if len(loss):
        out["loss"] = f"{float(loss['value'].iloc[-1]):.4g}"
    return out


def png_html(fig: Any, alt: str) -> str:
    """A figure as an inline PNG <img> (closed after)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _profile_png(frame: pd.DataFrame) -> str:
    import matplotlib.pyplot as plt

    from gradscope import plot

    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    try:
        plot.gradient_profile(frame, "last", ax=ax)
    except plot.PlotError as e:
        plt.close(fig)
        return f"<i>{html.escape(str(e))}</i>"
    ax.set_title("Gradient norm against depth, last step", fontsize=9)
    return png_html(fig, "gradient profile at the last recorded step")


def summary_html(title: str, frame: pd.DataFrame, verdicts: list[Verdict]) -> str:
    """The compact summary: title, headline numbers, worst verdicts, the gradient profile."""
    numbers = "".join(
        f"<tr><td style='text-align:left'>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
        for k, v in headline_numbers(frame).items()
    )
    figure = _profile_png(frame) if len(frame) else ""
    return (
        "<div style='display:flex;gap:1.5em;align-items:flex-start'>"
        f"<div><b>{html.escape(title)}</b><table>{numbers}</table>"
        f"{verdicts_html(verdicts)}</div><div>{figure}</div></div>"
    )


def recorder_html(recorder: Any) -> str:
    """A Recorder's summary (diagnosed over what it has recorded so far)."""
    frame = recorder.to_frame()
    verdicts = recorder.diagnose() if len(frame) else []
    model = recorder.model_summary.get("class", "model")
    state = "attached" if recorder.attached else "detached"
    return summary_html(f"gradscope Recorder ({model}, {state})", frame, verdicts)


def run_html(run: Any) -> str:
    """A saved Run's summary (its saved verdicts)."""
    name = run.info.get("name", run.path.name)
    return summary_html(f"gradscope run {name}", run.frame, list(run.verdicts))


def sweep_html(result: Any) -> str:
    """A sweep's results (a SweepResult): runs finished, the trainability map (a small
    figure)."""
    import matplotlib.pyplot as plt

    from gradscope import plot

    runs = result.runs
    if runs.empty:
        return "<i>gradscope sweep: no finished run yet</i>"
    fig, ax = plt.subplots(figsize=(1.0 * runs["depth"].nunique() + 2.4, 2.8))
    try:
        plot.trainability_map(runs, ax=ax)
        figure = png_html(fig, "trainability map")
    except plot.PlotError as e:
        plt.close(fig)
        figure = f"<i>{html.escape(str(e))}</i>"
    best = runs.loc[runs["test_acc"].idxmax()] if runs["test_acc"].notna().any() else None
    line = (
        f"best: {best['variant']} depth {best['depth']}, test accuracy {best['test_acc']:.1%}"
        if best is not None
        else ""
    )
    return (
        f"<div><b>gradscope depth sweep: {len(runs)} runs</b> {html.escape(line)}<br>{figure}</div>"
    )
