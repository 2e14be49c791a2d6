"""The run report's "Tried" section: each remedy rerun from the same start, its loss curve
beside the baseline's, the verdicts it cleared and the line of code to adopt it.
"""

from __future__ import annotations

import html
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gradscope.remedies.trial import Trial, TrialRun  # noqa: E402
from gradscope.report.html import Section, figure_html  # noqa: E402

COLUMNS = 3  # loss panels per row
COLOURS = {"better": "#1b7a1b", "worse": "#b22222", "no change": "#555555"}


def tried_text(trial: Trial) -> str:
    """One sentence: what the trial found."""
    best = trial.best
    ran = [r for r in trial.runs[1:] if r.losses]
    what = f"{len(trial.runs) - 1} remedies rerun for {trial.steps} steps from the same start"
    if len(trial.runs) == 1:
        return f"No remedy was tried: the baseline's verdicts propose none ({what})."
    if best is None:
        return f"Nothing beat the baseline ({what}, {len(ran)} of them ran)."
    run = next(r for r in trial.runs if r.remedy is best)
    return (
        f"Best: {best.name}, final loss {_num(run.final_loss)} against the baseline's "
        f"{_num(trial.baseline.final_loss)} ({what})."
    )


def tried_section(trial: Trial) -> Section:
    """The "Tried" section of the run report."""
    return Section("Tried", tried_text(trial), [tried_html(trial)])


def tried_html(trial: Trial) -> str:
    """The section's HTML: the comparison table, the loss curves, each remedy in words and
    code."""
    return "\n".join([_table(trial), _curves(trial), _remedies(trial)])


def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else ("diverged" if x == math.inf else "-")


def _table(trial: Trial) -> str:
    table = trial.table()
    head = ["remedy", "outcome", "final loss", "spread", "gain", "cleared", "new", "seconds"]
    has_acc = "accuracy" in table.columns
    if has_acc:
        head.insert(4, "accuracy")
    rows = []
    for row in table.itertuples(index=False):
        outcome = str(row.outcome)
        colour = COLOURS.get(outcome, "#8a6d00" if outcome else "#000")
        cells = [
            f"<b>{html.escape(str(row.remedy))}</b>",
            f'<span style="color:{colour}">{html.escape(outcome or "the run as it is")}</span>',
            _num(row.final_loss),
            _num(row.loss_spread),
            "" if row.remedy == "baseline" or math.isnan(row.gain) else f"{row.gain:+.0%}",
            html.escape(str(row.cleared)) or "-",
            html.escape(str(row.new)) or "-",
            f"{row.seconds:.1f}",
        ]
        if has_acc:
            cells.insert(4, _num(float(row.accuracy)))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in head)
    return (
        f'<table class="table tried"><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        "<p><small>final loss: the mean over the last tenth of the steps; gain: its relative "
        "drop against the baseline's (within 2%: no change); cleared / new: warning and error "
        "verdicts the baseline had and this run has not, and the reverse.</small></p>"
    )


def _curves(trial: Trial) -> str:
    runs = [r for r in trial.runs[1:] if r.losses]
    base = trial.baseline
    if not runs:
        if not base.losses:
            return ""
        runs = []
    panels = runs or [base]
    rows = math.ceil(len(panels) / COLUMNS)
    fig, axes = plt.subplots(
        rows, min(COLUMNS, len(panels)), figsize=(4.4 * min(COLUMNS, len(panels)), 3.0 * rows),
        squeeze=False, sharey=True,
    )  # fmt: skip
    finite = np.concatenate([np.asarray(r.losses, float) for r in [base, *runs]])
    finite = finite[np.isfinite(finite)]
    log = len(finite) > 0 and bool((finite > 0).all())
    for ax, run in zip(axes.flat, panels, strict=False):
        _plot(ax, base, "baseline", "#999999")
        if run is not base:
            _plot(ax, run, run.name, COLOURS.get(trial.outcome(run), "#1f4e9a"))
            ax.set_title(f"{run.name}: {trial.outcome(run)}", fontsize=10)
        else:
            ax.set_title("baseline", fontsize=10)
        ax.set(xlabel="step", yscale="log" if log else "linear")
        ax.legend(fontsize=8, loc="upper right")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("training loss" + (" (log)" if log else ""))
    fig.tight_layout()
    return figure_html(fig, "loss curve of each remedy beside the baseline's")


def _plot(ax: plt.Axes, run: TrialRun, label: str, colour: str) -> None:
    losses = np.asarray(run.losses, dtype=float)
    ax.plot(np.arange(len(losses)), np.where(np.isfinite(losses), losses, np.nan), color=colour,
            lw=1.2, label=label)  # fmt: skip
    bad = np.flatnonzero(~np.isfinite(losses))
    if len(bad):  # a gap is easy to miss: mark where the run went non-finite
        ax.axvline(bad[0], color=colour, ls=":", lw=1)
        ax.text(bad[0], 0.95, f" non-finite from {bad[0]}", color=colour, fontsize=7,
                transform=ax.get_xaxis_transform(), va="top")  # fmt: skip


def _remedies(trial: Trial) -> str:
    items = []
    for run in trial.runs[1:]:
        r = run.remedy
        if r is None:
            continue
        items.append(
            f"<li><b>{html.escape(r.name)}</b> ({html.escape(trial.outcome(run))}): "
            f"{html.escape(r.description)}.<br><code>{html.escape(r.code)}</code></li>"
        )
    return f"<ul class='remedies'>{''.join(items)}</ul>" if items else ""
