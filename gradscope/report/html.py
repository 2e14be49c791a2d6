"""The HTML shell every report shares: sections of text, embedded figures and tables."""

from __future__ import annotations

import base64
import html
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import jinja2
import matplotlib

if "ipykernel" not in sys.modules:  # in a notebook, keep its inline backend for gradscope.plot
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


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


def panel(alt: str, draws: list[Callable[..., object]], width: float = 6.5,
          height: float = 4.0) -> str:  # fmt: skip
    """One figure of `draws` side by side (each a gradscope.plot function bound to its data,
    drawing into the Axes given); a draw with nothing to show (PlotError) gives its reason
    as a note instead of an empty panel."""
    from gradscope.plot import PlotError

    fig, axes = plt.subplots(1, len(draws), figsize=(width * len(draws), height), squeeze=False)
    notes = []
    for ax, draw in zip(axes[0], draws, strict=True):
        try:
            draw(ax=ax)
        except PlotError as e:
            notes.append(str(e))
            fig.delaxes(ax)
    if len(notes) == len(draws):
        plt.close(fig)
        return note_html("; ".join(notes))
    fig.tight_layout()
    return figure_html(fig, alt) + (note_html("; ".join(notes)) if notes else "")


def note_html(text: str) -> str:
    """A short grey note where a figure has nothing to show, saying why."""
    return f'<p class="note">{html.escape(text[0].upper() + text[1:])}.</p>'


def table_html(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """A plain HTML table of a frame, numbers formatted compactly."""
    formatters = {
        c: (lambda v, f=float_format: f.format(v) if pd.notna(v) else "")
        for c in frame.columns
        if pd.api.types.is_float_dtype(frame[c])
    }
    return frame.to_html(index=False, border=0, classes="table", formatters=formatters, escape=True)


def render_html(
    title: str, subtitle: str, sections: list[Section], reload_seconds: int | None = None
) -> str:
    """The whole page: no external resources, readable offline; `reload_seconds` makes the
    browser reload it (a report rewritten while its sweep runs)."""
    env = jinja2.Environment(autoescape=jinja2.select_autoescape(["html", "j2"]))
    source = resources.files("gradscope.report").joinpath("page.html.j2").read_text()
    template = env.from_string(source)
    return template.render(
        title=title,
        subtitle=subtitle,
        reload_seconds=reload_seconds,
        sections=[
            {
                "title": s.title,
                "text": s.text,
                "parts": [jinja2.utils.markupsafe.Markup(p) for p in s.parts],
            }
            for s in sections
        ],
    )
