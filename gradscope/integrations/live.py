"""The live view of a recording while it trains: in Jupyter a small panel (gradient profile
now, total gradient norm and loss so far, the current verdicts) redrawn in place every few
seconds; in a terminal one line of headlines per interval. `gs.watch(model, live=True)`.

Cheap by construction: at each recorded step it only reads the clock; every `interval`
seconds it reads the last recorded step's rows (a few hundred), diagnoses that step and
redraws three small inline SVG charts (not matplotlib: its text layout takes ~1 s a figure). At detach it draws the final state, which stays in the notebook.

Example:
    >>> import gradscope as gs, torch, io
    >>> out = io.StringIO()
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> with gs.watch(model, live=LiveView(interval=0.0, write=out.write)) as rec:
    ...     model(torch.randn(8, 4)).sum().backward()
    ...     rec.step()
    >>> out.getvalue().startswith("gradscope step 0:")
    True
"""

from __future__ import annotations

import html
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gradscope.integrations.headline import PREFIX, headline

DEFAULT_INTERVAL = 5.0  # seconds between redraws (benchmarks/live_view.py: its cost)
HISTORY = 2000  # points of the norm and loss curves kept (one per redraw)


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (an IPython ZMQ shell)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class LiveView:
    """Shows a recorder's newest step every `interval` seconds while it trains.

    Args:
        interval: seconds between updates (at most one per recorded step).
        notebook: draw a panel in Jupyter (True), print lines (False), or decide (None).
        write: where terminal lines go (default: sys.stderr's write).
    """

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        notebook: bool | None = None,
        write: Callable[[str], object] | None = None,
    ) -> None:
        self.interval = float(interval)
        self.notebook = in_notebook() if notebook is None else notebook
        self._write = write
        self._last = -math.inf
        self._steps: list[int] = []
        self._norms: list[float] = []
        self._losses: list[float] = []
        self._handle: Any = None
        self.updates = 0  # how many times it drew or printed

    def on_step(self, recorder: Any) -> None:
        """Called by the recorder when a recorded step closes: updates when due."""
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self.update(recorder)

    def update(self, recorder: Any) -> None:
        """Reads the newest recorded step and shows it now."""
        last = recorder.last_step_frame()
        if last.empty:
            return
        from gradscope.diagnose import diagnose

        step = int(last["step"].iloc[0])
        verdicts = diagnose(last, step)
        numbers = headline(last, verdicts)
        if not self._steps or self._steps[-1] != step:
            self._steps.append(step)
            self._norms.append(numbers.get(PREFIX + "grad_norm", math.nan))
            self._losses.append(numbers.get(PREFIX + "loss", math.nan))
            del self._steps[:-HISTORY], self._norms[:-HISTORY], self._losses[:-HISTORY]
        self.updates += 1
        if self.notebook:
            self._draw(last, step, numbers, [v for v in verdicts if v.id != "healthy"])
        else:
            write = self._write or sys.stderr.write
            write(line(step, numbers) + "\n")

    def close(self, recorder: Any) -> None:
        """The final state, drawn once more at detach (it stays in the notebook)."""
        self.update(recorder)

    # -- the notebook panel ----------------------------------------------------------------

    def _draw(self, last: Any, step: int, numbers: dict[str, float], verdicts: list[Any]) -> None:
        from IPython.display import HTML, display

        from gradscope import frame as fr
        from gradscope.integrations.notebook import verdicts_html

        prof = fr.gradient_profile(last, step)
        charts = (
            svg_chart(prof["index"].to_numpy(float), prof["norm"].to_numpy(float),
                      f"gradient norm per layer, step {step}", "weight matrix (input left)"),
            svg_chart(np.asarray(self._steps, float), np.asarray(self._norms, float),
                      "total gradient norm", "step"),
            svg_chart(np.asarray(self._steps, float), np.asarray(self._losses, float),
                      "loss", "step", log=False),
        )  # fmt: skip
        page = HTML(
            f"<div><b>{html.escape(line(step, numbers))}</b><br>"
            f'<div role="img" aria-label="gradscope live panel">{"".join(charts)}</div>'
            f"{verdicts_html(verdicts) if verdicts else '<i>no warnings</i>'}</div>"
        )
        if self._handle is None:
            self._handle = display(page, display_id=True)
        else:
            self._handle.update(page)


def svg_chart(
    x: np.ndarray, y: np.ndarray, title: str, xlabel: str, log: bool = True,
    width: int = 300, height: int = 150,
) -> str:  # fmt: skip
    """A small line chart as inline SVG: drawn in microseconds, where a matplotlib figure
    takes a second (text layout), too much to redraw while training. On a log axis, exact
    zeros are red triangles at the floor; min and max are labelled."""
    left, right, top, bottom = 46, 8, 18, 30
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'style="font:10px sans-serif;margin-right:8px">'
        f'<text x="{width / 2}" y="12" text-anchor="middle">{html.escape(title)}</text>'
        f'<rect x="{left}" y="{top}" width="{width - left - right}" '
        f'height="{height - top - bottom}" fill="none" stroke="#999"/>'
        f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    finite = np.isfinite(y) & np.isfinite(x) & ((y > 0) if log else True)
    if finite.sum() == 0:
        return (
            head
            + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>'
        )
    v = np.log10(y[finite]) if log else y[finite]
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = float(x[finite].min()), float(x[finite].max())
    x1 = x1 if x1 > x0 else x0 + 1

    def px(a: np.ndarray) -> np.ndarray:
        return left + (a - x0) / (x1 - x0) * (width - left - right)

    def py(a: np.ndarray) -> np.ndarray:
        return top + (hi - a) / (hi - lo) * (height - top - bottom)

    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(x[finite]), py(v), strict=True))
    fmt = (lambda t: f"{10**t:.2g}") if log else (lambda t: f"{t:.3g}")
    body = (
        f'<polyline points="{points}" fill="none" stroke="#3b528b" stroke-width="1.5"/>'
        f'<text x="{left - 3}" y="{top + 8}" text-anchor="end">{fmt(hi)}</text>'
        f'<text x="{left - 3}" y="{height - bottom}" text-anchor="end">{fmt(lo)}</text>'
        f'<text x="{left}" y="{height - bottom + 11}">{x0:.0f}</text>'
        f'<text x="{width - right}" y="{height - bottom + 11}" text-anchor="end">{x1:.0f}</text>'
    )
    if log:
        for a in px(x[np.isfinite(x) & (y == 0)]):
            floor = height - bottom - 2
            body += f'<path d="M{a - 4:.1f},{floor - 6} h8 l-4,6 z" fill="#b00020"/>'
    return head + body + "</svg>"


def line(step: int, numbers: dict[str, float]) -> str:
    """One line of headlines: step, gradient norm, first/last ratio, decay, loss, severity."""
    names = (
        ("grad_norm", "grad norm"),
        ("grad_ratio_first_last", "first/last"),
        ("grad_decay_per_layer", "decades/layer"),
        ("loss", "loss"),
    )
    parts = [f"{label} {numbers[PREFIX + key]:.3g}" for key, label in names
             if PREFIX + key in numbers]  # fmt: skip
    level = numbers.get(PREFIX + "worst_severity")
    if level is not None:
        from gradscope.verdict import SEVERITIES

        parts.append(f"worst {SEVERITIES[int(level)]}")
    return f"gradscope step {step}: " + ", ".join(parts)


def live_view(live: bool | float | LiveView | None) -> LiveView | None:
    """The Recorder's `live=` option as a LiveView: True the default interval, a number that
    many seconds, a LiveView itself, False or None none."""
    if live is None or live is False:
        return None
    if isinstance(live, LiveView):
        return live
    if live is True:
        return LiveView()
    return LiveView(interval=float(live))
