"""The run report: the verdicts first (under "What is wrong" only when something is), then
gradient flow over steps and depth, updates, activations, non-finite events and logged
scalars of one recorded run; every figure is a gradscope.plot function."""

from __future__ import annotations

import html
import json
from functools import partial
from typing import Any

import pandas as pd

from gradscope import frame as fr
from gradscope import plot
from gradscope.report.html import Section, panel, render_html, table_html
from gradscope.report.tried import tried_section
from gradscope.report.verdicts import heading, verdicts_html
from gradscope.runs import Run
from gradscope.schema import Kind, Stat

# Plain ReLU stacks under PyTorch's default init: the measured decay quoted on the page
PLAIN_RELU_DECAY = 0.39


def _nonfinite_html(frame: pd.DataFrame) -> str:
    origins = fr.select(frame, Kind.NONFINITE_ORIGIN)
    if origins.empty:
        return "<p>No inf or NaN in any recorded output, gradient or parameter.</p>"
    table = origins.rename(columns={"stat": "phase", "layer": "first non-finite in"})
    return table_html(table[["step", "phase", "first non-finite in"]].head(50))


def run_sections(run: Run, trial: Any = None) -> list[Section]:
    """The report's sections, figures drawn by gradscope.plot; with `trial`, what was tried."""
    frame, info = run.frame, run.info
    verdicts = run.verdicts
    layers = fr.weight_matrices(frame)
    rows = len(set(plot.row_groups(frame, layers).values()))
    grouped = f" ({len(layers)} matrices grouped into {rows} rows)" if rows < len(layers) else ""
    types = info.get("model", {}).get("types")
    spans = any(v.first_step is not None for v in verdicts)
    dead = _dead_stat(frame)
    return [
        Section(
            heading(verdicts),
            "Verdicts over the whole recording, worst first, each with the steps it holds over.",
            [verdicts_html(verdicts)]
            + (
                [
                    panel(
                        "when each verdict held",
                        [partial(plot.verdict_timeline, verdicts)],
                        width=9,
                        height=0.35 * len(verdicts) + 1.4,
                    )
                ]
                if spans
                else []
            ),  # fmt: skip
        ),
        *([] if trial is None else [tried_section(trial)]),
        Section(
            "Gradient norm over training",
            "Each row a weight matrix" + grouped + ", input side at the top; a colour fading "
            "toward the top is gradient vanishing toward the input. The colour scale is fixed "
            "(1e-10 to 1e2) in every report; exact zeros are blue.",
            [
                panel(
                    "layer by step heatmap of gradient norm",
                    [partial(plot.heatmap, frame)],
                    width=11,
                    height=min(12.0, max(3.5, 0.16 * rows + 1.5)),
                ),  # fmt: skip
                panel(
                    "gradient norm over steps",
                    [partial(plot.over_steps, frame)],
                    width=10,
                    height=3.5,
                ),  # fmt: skip
            ],
        ),
        Section(
            "Gradient profile and updates",
            "At the first, a middle and the last recorded step. Plain ReLU stacks under "
            f"PyTorch's default init lose about {PLAIN_RELU_DECAY} decades per layer. Exact "
            "zeros are drawn at the floor of the log axis.",
            [
                panel(
                    "gradient profile over depth and update ratios",
                    [partial(plot.gradient_profile, frame), partial(plot.update_ratio, frame)],
                )
            ],
        ),  # fmt: skip
        Section(
            "Activations",
            "Output rms of every module. Dead units: the share of a ReLU-like activation's "
            "units (features or channels) that are 0 for every sample of the batch. Zeros "
            "(elements): the share of its outputs exactly 0, about half for a healthy ReLU, "
            "which is sparsity, not death. Saturation only for bounded functions; the residual "
            "stream per block on its own axis.",
            [
                panel(
                    "activation rms and dead units",
                    [
                        partial(plot.activations, frame, "rms", types=types),
                        partial(plot.activations, frame, dead, types=types),
                    ],
                ),
                panel(
                    "zero elements and saturated fractions",
                    [
                        partial(plot.activations, frame, stat, types=types)
                        for stat in ("zero_frac", "saturated_frac")
                        if stat != dead  # (shown already where there are no dead units)
                    ],
                ),
                panel("residual stream", [partial(plot.residual_stream, frame)], width=9),
            ],  # fmt: skip
        ),
        Section("Non-finite values", "", [_nonfinite_html(frame)]),
        Section(
            "Logged scalars",
            ""
            if len(fr.select(frame, Kind.SCALAR))
            else "Without a logged loss the rule 'loss does not decrease' was not checked.",
            [
                panel(
                    "logged scalars over steps", [partial(plot.scalars, frame)], width=9, height=3.5
                )
            ],
        ),  # fmt: skip
        Section("Run", "", [f"<pre>{html.escape(json.dumps(_brief(info), indent=2))}</pre>"]),
    ]


def _dead_stat(frame: pd.DataFrame) -> str:
    """Dead units where the recording has them; a recording from before the per-unit
    statistic shows exact-zero elements in their place (what its verdict judged)."""
    has = len(fr.select(frame, Kind.ACTIVATION, Stat.DEAD_UNITS))
    return Stat.DEAD_UNITS if has else Stat.ZERO_FRAC


def _brief(info: dict[str, Any]) -> dict[str, Any]:
    """run.json without the bulky parts shown elsewhere (verdicts, module types)."""
    model = {k: v for k, v in info.get("model", {}).items() if k != "types"}
    return {**{k: v for k, v in info.items() if k != "verdicts"}, "model": model}


def _count(n: Any) -> str:
    """A count with thousands separators, or '?' where a run folder does not say."""
    return f"{n:,}" if isinstance(n, int) else "?"


def render_run_report(run: Run, trial: Any = None) -> Any:
    """Writes report.html into the run folder; returns its path. With `trial` (a
    gradscope.remedies.Trial), a "Tried" section after the verdicts."""
    info = run.info
    model, steps = info.get("model", {}), info.get("steps", {})
    optimizer = info.get("recorder", {}).get("optimizer")
    torch_version = info.get("versions", {}).get("torch")
    subtitle = "; ".join(
        [
            f"{model.get('class', 'model')} with {_count(model.get('parameters'))} parameters",
            f"{steps.get('recorded', 0)} recorded steps ({steps.get('first', '-')} to "
            f"{steps.get('last', '-')})",
        ]
        + ([f"optimizer {optimizer}"] if optimizer else [])
        + ([f"torch {torch_version}"] if torch_version else [])
    )
    if "spill" in info:  # a folder written while training: not a finished run
        subtitle += (
            f". The rows written so far ({info['spill'].get('parts', '?')} parts): the run is "
            "still training, or stopped before it was saved"
        )
    page = render_html(
        f"gradscope run: {info.get('name', run.path.name)}", subtitle, run_sections(run, trial)
    )
    path = run.path / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
