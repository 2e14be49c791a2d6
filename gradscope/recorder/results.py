"""What a recorder gives back: its frame, the last step, its settings and model summary, the
run folder (gradscope.runs) and the diagnosis. Reads only the recorder's rows (deferred.py)
and the summary it made at attach."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import torch  # noqa: F401  (the doctest below)

from gradscope.digest import log_frame
from gradscope.recorder.deferred import DeferredRows
from gradscope.verdict import VerdictList


class RecorderResults:
    """The results side of gradscope.Recorder."""

    _rows: DeferredRows
    _summary: dict[str, Any]
    _sync: bool
    every: Any
    include: Any
    exclude: Any
    activations: bool | None
    activation_grads: bool | None

    def to_frame(self) -> pd.DataFrame:
        """All recorded steps as one long-form frame: step, layer, kind, stat, value."""
        frame = self._rows.settled().to_frame()
        log_frame(frame)  # only with GRADSCOPE_FRAME_DIGEST set (gradscope/digest.py)
        return frame

    def last_step_frame(self) -> pd.DataFrame:
        """The last recorded step's rows (cheap: for logging headlines while training)."""
        return self._rows.settled().last_frame()

    def held_frame(self) -> pd.DataFrame:
        """The steps held in memory (not yet spilled) as a frame."""
        return self._rows.settled().held_frame()

    @property
    def spill_parts(self) -> list[Path]:
        """The Parquet parts written so far (spill_to only), in order."""
        return list(self._rows.settled().parts)

    @property
    def model_summary(self) -> dict[str, Any]:
        """The watched model as it was at the last attach: class, sizes, what is recorded."""
        return dict(self._summary)

    def settings(self) -> dict[str, Any]:
        """The recorder's settings, as text where they are callables."""
        return {
            "every": self.every if isinstance(self.every, int) else repr(self.every),
            "include": repr(self.include) if callable(self.include) else self.include,
            "exclude": repr(self.exclude) if callable(self.exclude) else self.exclude,
            "activations": self.activations,
            "activation_grads": self.activation_grads,
            "sync": self._sync,
            "optimizer": self._summary.get("optimizer"),
        }

    def save(self, path: str | os.PathLike[str], name: str | None = None) -> Path:
        """Writes the run folder (frame.parquet, run.json, report.html); see gradscope.runs.

        Example:
            >>> import tempfile
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
            >>> from gradscope import watch
            >>> with watch(model) as rec:
            ...     model(torch.randn(8, 4)).sum().backward()
            ...     rec.step()
            >>> rec.save(tempfile.mkdtemp()).joinpath("run.json").is_file()
            True
        """
        # The one place the recorder reaches up to the reports, and only when called: a
        # saved run comes with its report, while importing the recorder loads no plotting.
        from gradscope.report.run import render_run_report
        from gradscope.runs import save_run

        return save_run(self, Path(path), name, render=render_run_report)

    def diagnose(self) -> list[Any]:
        """Verdicts over everything recorded so far (see gradscope.diagnose)."""
        from gradscope.diagnose import diagnose

        return VerdictList(diagnose(self.to_frame(), model=self._summary))

    def _repr_html_(self) -> str:
        from gradscope.integrations.notebook import recorder_html

        return recorder_html(self)
