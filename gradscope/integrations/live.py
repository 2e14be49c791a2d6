"""The live view of a recording while it trains: in Jupyter a small panel (gradient profile
now, total gradient norm and loss so far, the current verdicts) redrawn in place every few
seconds; in a terminal one line of headlines per interval. `gs.watch(model, live=True)`.

Cheap by construction: at each recorded step it only reads the clock; every `interval`
seconds it reads the last recorded step's rows (a few hundred), diagnoses that step and
redraws one reused figure. At detach it draws the final state, which stays in the notebook.

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

import base64
import io
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
        self._figure: Any = None
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
        step = int(last["step"].iloc[0])
        numbers = headline(last)
        if not self._steps or self._steps[-1] != step:
            self._steps.append(step)
            self._norms.append(numbers.get(PREFIX + "grad_norm", math.nan))
            self._losses.append(numbers.get(PREFIX + "loss", math.nan))
            del self._steps[:-HISTORY], self._norms[:-HISTORY], self._losses[:-HISTORY]
        self.updates += 1
        if self.notebook:
            self._draw(last, step, numbers)
        else:
            write = self._write or sys.stderr.write
            write(line(step, numbers) + "\n")

    def close(self, recorder: Any) -> None:
        """The final state, drawn once more at detach (it stays in the notebook)."""
        self.update(recorder)
        if self._figure is not None:
            import matplotlib.pyplot as plt

            plt.close(self._figure[0])
            self._figure = None

    # -- the notebook panel ----------------------------------------------------------------

    def _draw(self, last: Any, step: int, numbers: dict[str, float]) -> None:
        from IPython.display import HTML, display

        from gradscope import frame as fr
        from gradscope.diagnose import diagnose
        from gradscope.integrations.notebook import verdicts_html

        fig, axes = self._axes()
        for ax in axes:
            ax.cla()
        prof = fr.gradient_profile(last, step)
        norms = prof["norm"].to_numpy(dtype=float)
        axes[0].plot(prof["index"], np.where(norms > 0, norms, np.nan), ".-", color="#3b528b")
        zeros = prof["index"][norms == 0]
        if len(zeros) and (norms > 0).any():
            axes[0].plot(zeros, np.full(len(zeros), norms[norms > 0].min() / 10), "v", color="red")
        axes[0].set(yscale="log", title=f"gradient norm per layer, step {step}",
                    xlabel="weight matrix (input left)")  # fmt: skip
        axes[1].plot(self._steps, self._norms, ".-", color="#21918c")
        axes[1].set(yscale="log", title="total gradient norm", xlabel="step")
        if np.isfinite(self._losses).any():
            axes[2].plot(self._steps, self._losses, ".-", color="#b5367a")
        axes[2].set(title="loss", xlabel="step")
        for ax in axes:
            ax.title.set_fontsize(9)
            ax.tick_params(labelsize=7)
            ax.xaxis.label.set_fontsize(8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=60)
        png = base64.b64encode(buf.getvalue()).decode("ascii")
        verdicts = [v for v in diagnose(last, step) if v.id != "healthy"]
        page = HTML(
            f"<div><b>gradscope</b> {line(step, numbers)}<br>"
            f'<img alt="gradscope live panel" src="data:image/png;base64,{png}">'
            f"{verdicts_html(verdicts) if verdicts else '<i>no warnings</i>'}</div>"
        )
        if self._handle is None:
            self._handle = display(page, display_id=True)
        else:
            self._handle.update(page)

    def _axes(self) -> Any:
        if self._figure is None:
            from matplotlib.figure import Figure

            # a Figure outside pyplot: the notebook's inline backend does not show it twice
            fig = Figure(figsize=(10, 2.6))
            axes = fig.subplots(1, 3)
            fig.subplots_adjust(left=0.06, right=0.98, bottom=0.2, top=0.85, wspace=0.3)
            self._figure = (fig, axes)
        return self._figure


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
