"""Reports for `gradscope reproduce`: measured against published, and the gradients behind it."""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradscope.lab.reproduce import Reproduction
from gradscope.plot import reproduce as figures
from gradscope.plot.common import PlotError
from gradscope.report.html import Section, figure_html, note_html, render_html, table_html


def _figure(draw: Callable[[Reproduction], Any], result: Reproduction, alt: str) -> str:
    try:
        fig = draw(result)
    except PlotError as e:
        return note_html(str(e))
    return figure_html(fig, alt)


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


def render_reproduction(result: Reproduction, out: Path) -> Path:
    """Writes report.html for one reproduction into out; returns its path."""
    sections = [Section("Result", INTRO.get(result.name, ""), [table_html(result.table)])]
    if result.name == "clipping":
        sections.append(
            Section(
                "Gradient norm, loss and update over time",
                "",
                [
                    _figure(
                        figures.clipping_effect,
                        result,
                        "clipping: gradient norm, loss, update norm",
                    )
                ],
            )
        )
    else:
        sections.append(
            Section(
                "Accuracy",
                "",
                [
                    _figure(
                        figures.accuracy_vs_published, result, "measured accuracy against published"
                    )
                ],
            )
        )
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
        sections.append(
            Section(
                "Weights",
                "",
                [
                    _figure(
                        figures.weights_and_sparsity, result, "weight norms and sparsity per layer"
                    )
                ],
            )
        )
    if result.name != "clipping":
        sections.append(
            Section(
                "Gradient flow",
                "Recorded with gradscope's Recorder.",
                [
                    _figure(
                        figures.gradient_flow, result, "per-layer gradient norms and update ratios"
                    )
                ],
            )
        )
        sections.append(
            Section("Loss", "", [_figure(figures.loss_curves, result, "training loss curves")])
        )
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
