"""The depth-sweep report: the trainability map and story first, then gradient profiles,
ratios, slopes, heatmaps, activations, accuracy and verdicts; every figure is a
gradscope.plot function. Rewritten as runs finish, marked in progress until the sweep ends."""

from __future__ import annotations

import html
import json
import math
import os
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from gradscope import plot
from gradscope.lab.sweep import SweepError, SweepResult, load_sweep
from gradscope.lab.sweep.result import TRAINS
from gradscope.plot import sweep as sweep_plots
from gradscope.plot.common import PlotError
from gradscope.report.html import Section, figure_html, note_html, panel, render_html, table_html
from gradscope.report.summary import story, story_html
from gradscope.report.verdicts import verdict_html

# seconds between reloads of a report whose sweep is still running
RELOAD_SECONDS = 10
# the in-progress report is redrawn at most this often, and never more than a quarter of the
# time (a sweep of hundreds of runs would otherwise spend most of it redrawing its report)
REDRAW_SECONDS = 10
REDRAW_SHARE = 0.25


def _figure(draw: Any, alt: str) -> str:
    """A figure-level drawing (a Figure or FacetGrid), or the note saying why there is none."""
    try:
        fig = draw()
    except PlotError as e:
        return note_html(str(e))
    return figure_html(getattr(fig, "figure", fig), alt)


def _verdict_html(result: SweepResult) -> str:
    found = result.deepest_verdicts()
    runs = list(dict.fromkeys(run for _, run, _ in found))
    return "\n".join(
        verdict_html(v, where=f"{run.run_id}, {phase}")
        for each in runs  # each run's verdicts at init, then after training
        for phase, run, v in found
        if run == each
    )


_TROUBLE = {
    "vanishing": "gradients vanish",
    "exploding": "gradients explode",
    "diverged": "diverges (the loss is not finite)",
    "chance": "stays at chance",
}


def what_trains_html(result: SweepResult) -> str:
    """The "what trains here" list: one item per failing cell of the sweep, with what trains
    at its depth (SweepResult.what_trains) and the line of code to adopt the best."""
    table = result.what_trains()
    if table.empty:
        return note_html("no failing cell: every run swept trains, its gradients healthy")
    items = []
    for (variant, depth), rows in table.groupby(["variant", "depth"], sort=False):
        cell = rows.iloc[0]
        ratios = [
            f"{ratio:.2g} {when}"
            for ratio, when in (
                (cell.grad_ratio_init, "at init"),
                (cell.grad_ratio_end, "after training"),
            )
            if math.isfinite(ratio)
        ]
        text = f"<b>{html.escape(f'{variant} at depth {depth}')}</b>: {_TROUBLE[cell.word]}"
        text += f" (first/last layer gradient {', '.join(ratios)})" if ratios else ""
        text += f", test accuracy {cell.test_acc:.0%}. "
        fixes = rows[rows["fix"] != ""]
        if len(fixes):
            trains = ", ".join(f"{f.fix} {f.fix_acc:.1%}" for f in fixes.itertuples())
            text += html.escape(f"At depth {depth} these train: {trains}.")
        else:
            text += html.escape(f"Nothing in this sweep trains at depth {depth}.")
        if math.isfinite(cell.trains_to):
            text += html.escape(
                f" The deepest {variant} that trains here: depth {cell.trains_to:.0f}."
            )
        if len(fixes) and fixes.iloc[0].code:
            best = fixes.iloc[0]
            text += f"<br>To adopt {html.escape(best.fix)}: <code>{html.escape(best.code)}</code>"
        items.append(f"<li>{text}</li>")
    return "<ul class='what-trains'>" + "".join(items) + "</ul>"


def render_sweep_report(
    result: SweepResult, path: Path | None = None, in_progress: bool = False
) -> Path:
    """Renders a sweep's results (`gradscope.lab.sweep.load_sweep(folder)`) as one HTML page,
    written to `path` (default: report.html in the sweep's folder); returns its path.

    `in_progress` marks the page as a sweep still running: a banner, the planned cells of the
    map left blank, and a reload every RELOAD_SECONDS until the final page replaces it.
    """
    if path is None:
        if result.folder is None:
            raise ValueError("the sweep result has no folder: pass the report's path")
        path = result.folder / "report.html"
    page = sweep_report_html(result, in_progress)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one writer's own file
    tmp.write_text(page)
    tmp.replace(path)
    return path


def sweep_report_html(result: SweepResult, in_progress: bool = False) -> str:
    """The sweep report's page (see render_sweep_report)."""
    frame, runs, loss = result.frame, result.runs, result.losses
    config = result.config.to_json()
    palette = plot.variant_palette()
    variants = result.variants
    planned = result.planned
    subtitle = (
        f"{len(runs)} of {planned} runs finished; dataset {config['dataset']}, "
        f"optimizer {config['optimizer']}, width {config['width']}, activation "
        f"{config['activation']}, init {config['init']}, {config['steps']} steps of batch "
        f"{config['batch_size']}, recorded every {config['every']} steps."
    )
    if in_progress:
        subtitle = f"In progress: {subtitle} This page reloads every {RELOAD_SECONDS} s."
    sections = []
    if in_progress:
        sections.append(
            Section(
                "In progress",
                f"{len(runs)} of {planned} runs finished. The map fills in as runs finish; the "
                "figures over layers and steps follow when the sweep ends.",
            )
        )
    if len(runs):
        # in progress: every planned cell, blank until its run finishes
        depths = config["depths"] if in_progress else None
        rows = list(config["variants"]) if in_progress else variants
        sections += [
            Section(
                "The answer",
                "",
                [
                    panel(
                        "trainability map: variant by depth, test accuracy and verdict",
                        [partial(plot.trainability_map, runs, rows, depths)],
                        width=1.2 * len(depths or set(runs["depth"])) + 2.4,
                        height=0.55 * len(rows) + 1.2,
                    ),
                    story_html(story(result)),
                ],  # fmt: skip
            ),
            Section(
                "What trains here",
                "For each failing cell (gradients that vanish or explode, a loss that diverges, "
                "test accuracy at chance): the variants that train at the same depth in this "
                f"sweep's own runs (healthy, test accuracy above {TRAINS:.0%}, mean over "
                "seeds), best first, and the line that turns a plain stack into the best one. "
                f"Every run here uses the {config['init']} init; sweep again with --init to "
                "compare inits.",
                [what_trains_html(result)],
            ),
        ]
    if len(runs) and len(frame) and not in_progress:
        sections += [
            Section(
                "1. Gradient norm against layer",
                "Each line is one depth. A line falling toward layer 0 is vanishing; rising, "
                "exploding. Plain stacks lose about 0.39 decades per layer under PyTorch's "
                "default init.",
                [_figure(partial(sweep_plots.profiles_by_depth, frame, variants),
                         "gradient norm against layer index per variant and depth")],
            ),
            Section(
                "2-3. First/last ratio and decay slope against depth",
                "",
                [panel("gradient ratio and decay slope against depth",
                       [partial(plot.ratio_vs_depth, runs, "init", palette=palette),
                        partial(plot.ratio_vs_depth, runs, "end", palette=palette),
                        partial(plot.slope_vs_depth, runs, "init", palette=palette)],
                       width=5)],
            ),
            Section(
                "4. Gradient norm over training",
                "Colour scale fixed (log10 1e-10 to 1e2) in every report; exact zeros blue.",
                [_figure(partial(sweep_plots.deepest_heatmaps, frame, runs, variants),
                         "layer by step heatmap of gradient norm")],
            ),
            Section(
                "5. Activations",
                "Rms of each activation output at init and after training (what separates "
                "the variants), and the fraction of exactly zero or saturated outputs.",
                [_figure(partial(sweep_plots.activations_by_variant, frame, runs, palette),
                         "activation statistics against layer")],
            ),
            Section(
                "6. Accuracy and loss",
                "",
                [_figure(partial(sweep_plots.accuracy_and_loss, runs, loss, palette),
                         "test accuracy against depth and loss curves")],
            ),
            Section(
                "Signal propagation at init",
                "Per block of the deepest run: the residual stream's rms, the rms of what "
                "each block adds (its branch), and the gradient norm at the block's output. "
                "Pre-LN streams grow with depth while their branches stay put; an "
                "unnormalized residual stream grows until it overflows.",
                [_figure(partial(sweep_plots.signal_propagation, frame, runs, config, palette),
                         "signal propagation at init: stream, branch and gradient per block")],
            ),
        ]  # fmt: skip
    sections += [
        Section("7. Verdicts (deepest run of each variant)", "", [_verdict_html(result)]),
        Section("Runs", "", [table_html(runs)]),
        Section("Configuration", "", [f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>"]),
    ]
    return render_html(
        "gradscope depth sweep" + (" (in progress)" if in_progress else ""),
        subtitle,
        sections,
        reload_seconds=RELOAD_SECONDS if in_progress else None,
    )


def render_progress(out: Path, done: int, total: int) -> Path | None:
    """The sweep's report as its runs finish: in progress (reloading itself) while `done`
    of this call's `total` runs have finished, the whole report once all have. A report that
    cannot be drawn now (a run being written) is left as it was: training goes on.
    """
    try:
        return render_sweep_report(load_sweep(out), in_progress=done < total)
    except (SweepError, OSError, ValueError) as e:
        warnings.warn(f"gradscope: the sweep report was not updated ({e})", stacklevel=2)
        return None


class ProgressReport:
    """The sweep's report.html while it runs, for `run_sweep(on_run_finished=...)`: drawn
    (render_progress) as the first run finishes, then once a run finishes at least
    REDRAW_SECONDS after the last drawing, or longer where drawing took more than
    REDRAW_SHARE of the time since (its cost grows with the runs). The last run is left to
    the caller, who writes the whole report once the sweep ends (the CLI's _write_outputs).
    """

    def __init__(self, out: Path, clock: Any = time.monotonic) -> None:
        self.out, self.clock = out, clock
        self.drawn_at: float | None = None  # when the last drawing ended
        self.took = 0.0  # how long it took

    def __call__(self, done: int, total: int) -> None:
        if done >= total:
            return
        now = self.clock()
        if self.drawn_at is not None:
            wait = max(REDRAW_SECONDS, self.took * (1 - REDRAW_SHARE) / REDRAW_SHARE)
            if now - self.drawn_at < wait:
                return
        render_progress(self.out, done, total)
        self.drawn_at = self.clock()
        self.took = self.drawn_at - now
