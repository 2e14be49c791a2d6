"""The HTML shell every report shares: sections of text, embedded figures and tables."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from importlib import resources

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


@dataclass
class Section:
    """One part of a report: a heading, a paragraph, and HTML fragments (figures, tables)."""

    title: str
    text: str = ""
    parts: list[str] = field(default_factory=list)


def figure_html(fig: plt.Figure, alt: str) -> str:
    """Embeds a matplotlib figure as a PNG data URI and closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def log_norm_heatmap(ax: plt.Axes, wide: pd.DataFrame, y_labels: int, x_labels: int) -> None:
    """A row x step table of gradient norms as a log10 heatmap (zeros left blank), with
    about `y_labels` row and `x_labels` step labels."""
    with np.errstate(divide="ignore"):
        logs = np.log10(wide.where(wide > 0))
    sns.heatmap(
        logs,
        ax=ax,
        cmap="magma",
        cbar_kws={"label": "log10 gradient norm"},
        yticklabels=max(1, len(wide) // y_labels),
        xticklabels=max(1, wide.shape[1] // x_labels),
    )


def table_html(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """A plain HTML table of a frame, numbers formatted compactly."""
    formatters = {
        c: (lambda v, f=float_format: f.format(v) if pd.notna(v) else "")
        for c in frame.columns
        if pd.api.types.is_float_dtype(frame[c])
    }
    return frame.to_html(index=False, border=0, classes="table", formatters=formatters, escape=True)


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    """The whole page: no external resources, readable offline."""
    env = jinja2.Environment(autoescape=jinja2.select_autoescape(["html", "j2"]))
    source = resources.files("gradscope.report").joinpath("page.html.j2").read_text()
    template = env.from_string(source)
    return template.render(
        title=title,
        subtitle=subtitle,
        sections=[
            {
                "title": s.title,
                "text": s.text,
                "parts": [jinja2.utils.markupsafe.Markup(p) for p in s.parts],
            }
            for s in sections
        ],
    )
