"""The run folder a trainer callback keeps up to date while it trains: the recorder spills its
rows into the folder as Parquet parts every `save_every` recorded steps, so `gradscope report`
and `gradscope.load_run` read a run that is still training or was killed; at the end the
whole run is saved over it (gradscope.runs.save_run, one atomic folder swap).

Each part holds only the rows recorded since the last one, so keeping the folder current costs
O(steps) in all, not a full save every N steps (O(steps^2)); `benchmarks/run_folder.py`
measures it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

DEFAULT_SAVE_EVERY = 100  # recorded steps between two parts
SAVE_SECONDS = 60.0  # and at most this long between two parts while recording


def folder_options(
    out: Path | None, save_every: int | None, recorder_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The Recorder options of a callback that keeps `out` current every `save_every`
    recorded steps: its rows spilled into `out` (an explicit `spill_to=` is kept as given;
    `save_every=None` or no `out` spills nothing)."""
    if save_every is not None and (
        isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1
    ):
        raise ValueError(f"save_every must be an integer >= 1 or None, got {save_every!r}")
    if out is None or save_every is None or "spill_to" in recorder_kwargs:
        return recorder_kwargs
    return {
        "spill_seconds": SAVE_SECONDS,
        **recorder_kwargs,
        "spill_to": out,
        "spill_steps": save_every,
    }


def clear_earlier_run(recorder: Any) -> None:
    """Before a callback's recorder first spills into its folder: the files of a run saved
    there before (run.json, frame.parquet, report.html, parts) are removed, so that the
    folder read while training is this run, not the last one (the end's save would replace
    it anyway). Other files in the folder (notes) stay."""
    from gradscope.runs import RUN_FILES, spill_parts

    folder = recorder.spill_to
    if folder is None or recorder.spill_parts or not Path(folder).is_dir():
        return
    # run.json first: from then on the folder no longer reads as the earlier run
    for name in (*sorted(RUN_FILES, key=lambda n: n != "run.json"), "spill.json"):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    for part in spill_parts(folder):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
