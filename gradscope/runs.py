"""Your own run as a folder: frame.parquet, run.json (model, settings, versions, verdicts) and
report.html; loading it back (gradscope.diff compares two).

    run/
      frame.parquet   every recorded row (step, layer, kind, stat, value)
      run.json        what was recorded and how, the frame's row count and digest, and the
                      verdicts at the last step (read through gradscope.formats)
      report.html     the run report (gradscope.report.run)

A save writes the whole folder beside the old one and swaps it in, so a reader (or a kill
-9 during the save) sees the old run or the new one, never a mix. `load_run` also reads a
recorder's spill folder (part-*.parquet), whatever was written before a crash.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gradscope import formats
from gradscope.diagnose import SEVERITIES, Verdict, diagnose
from gradscope.files import file_digest, named, pid_alive, replace_dir
from gradscope.schema import COLUMNS
from gradscope.verdict import VerdictList
from gradscope.version import __version__

FORMAT = formats.RUN_FORMAT  # run.json's "format": bumped when the folder's layout changes
# the files a save writes: everything else in a run folder (your notes) is carried over
RUN_FILES = ("frame.parquet", "run.json", "report.html")


class RunError(formats.FormatError):
    """A folder that is not a readable run; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Run:
    """A saved run: its frame, what run.json says, and its verdicts."""

    path: Path
    frame: pd.DataFrame
    info: dict[str, Any]

    @property
    def verdicts(self) -> list[Verdict]:
        return VerdictList(Verdict(**v) for v in self.info.get("verdicts", []))

    def _repr_html_(self) -> str:
        from gradscope.integrations.notebook import run_html

        return run_html(self)


def save_run(
    recorder: Any,
    path: str | Path,
    name: str | None = None,
    render: Callable[[Run], object] | None = None,
) -> Path:
    """Writes a recorder's run folder (see the module docstring); returns its path.

    The run folder holds data; `render(run)`, when given, writes the report into the folder
    before it is swapped in (`Recorder.save` passes gradscope.report.run's renderer).

    The folder is written whole under a temporary name beside `path` and swapped in: an
    existing run there is replaced at once, and a failed or killed save leaves it as it was.
    A spilled recording is copied part by part into frame.parquet; the verdicts are over the
    whole recording (gradscope.diagnose).

    Raises:
        RunError: `path` is a file, or a folder holding other files than a run's.
        OSError: the folder cannot be written (a full disk, no permission); it names the file.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file, not a run folder")
    if out.is_dir() and any(out.iterdir()) and not is_run_folder(out):
        raise RunError(f"{out} holds other files and is not a run folder: save into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    staging = out.with_name(f".{out.name}.saving-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        _write_folder(recorder, staging, name or out.name, render)
        if out.is_dir():  # carry over what is not the run's own (notes, spill parts)
            for entry in out.iterdir():
                if entry.name not in RUN_FILES:
                    copy = shutil.copytree if entry.is_dir() else shutil.copy2
                    copy(entry, staging / entry.name)
        replace_dir(staging, out)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise named(e, out) from e
        raise
    return out


def _write_folder(
    recorder: Any, out: Path, name: str, render: Callable[[Run], object] | None
) -> None:
    parts = list(getattr(recorder, "spill_parts", []))
    held = recorder.held_frame() if parts else recorder.to_frame()
    _write_frame(out / "frame.parquet", parts, held)
    whole = pd.read_parquet(out / "frame.parquet") if parts else held
    verdicts = diagnose(whole, model=recorder.model_summary) if len(whole) else []
    info = {
        "format": FORMAT,
        "name": name,
        "model": recorder.model_summary,
        "recorder": recorder.settings(),
        "steps": _steps(out / "frame.parquet"),
        "frame": {"rows": len(whole), "sha256": file_digest(out / "frame.parquet")},
        "versions": {
            "gradscope": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "verdicts": [_jsonable(v.to_dict()) for v in verdicts],
    }
    (out / "run.json").write_text(json.dumps(info, indent=2))
    if render is not None:
        render(load_run(out))


def _remove_stale(out: Path) -> None:
    """Removes what killed saves to `out` left beside it (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(saving|old)-(\d+)$")
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m and not pid_alive(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def load_run(path: str | Path) -> Run:
    """Reads a run folder back (or a recorder's spill folder: its parts so far).

    Checks run.json field by field (gradscope.formats) and that frame.parquet is the frame
    it was saved with (row count and digest, from format 2 on).

    Raises:
        RunError: no such folder, not a run folder, or a damaged, hand-edited or mismatched
            run.json or frame.parquet; the message names the file (and the field).
    """
    out = Path(path)
    if not out.is_dir():
        raise RunError(f"{out} is not a folder")
    info_path, frame_path = out / "run.json", out / "frame.parquet"
    if not info_path.is_file() and spill_parts(out):
        return _load_spill(out)
    if not info_path.is_file() or not frame_path.is_file():
        raise RunError(f"{out} is not a run folder (it needs run.json and frame.parquet)")
    try:
        info = formats.check_run_info(formats.read_json(info_path), info_path, list(SEVERITIES))
    except formats.FormatError as e:
        raise RunError(str(e)) from None
    except OSError as e:
        raise named(e, info_path) from e
    expected = info.get("frame")
    if expected is not None:
        rows = _read_rows(frame_path)
        if rows != expected["rows"]:
            raise RunError(
                f"{frame_path} has {rows} rows but {info_path} was saved with "
                f"{expected['rows']}: the two files are not from one save"
            )
        if file_digest(frame_path) != expected["sha256"]:
            raise RunError(
                f"{frame_path} is not the frame {info_path} was saved with (its digest "
                "differs): the two files are not from one save"
            )
    frame = _read_frame(frame_path)
    return Run(out, frame, info)


_T = TypeVar("_T")


def _read_parquet(path: Path, read: Callable[[Path], _T]) -> _T:
    """`read(path)`, any error it raises as one that names the file."""
    try:
        return read(path)
    except OSError as e:
        if e.errno is not None:
            raise named(e, path) from e
        raise RunError(f"{path} is not a readable Parquet file ({e})") from None
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise RunError(f"{path} is not a readable Parquet file ({e})") from None


def _read_rows(path: Path) -> int:
    return _read_parquet(path, lambda p: int(pq.read_metadata(p).num_rows))


def _read_frame(path: Path) -> pd.DataFrame:
    frame = _read_parquet(path, pd.read_parquet)
    if list(frame.columns) != list(COLUMNS):
        raise RunError(f"{path} has columns {list(frame.columns)}, expected {list(COLUMNS)}")
    return frame


def spill_parts(folder: Path) -> list[Path]:
    """A spill folder's parts, in order (a part is complete once it has its name)."""
    return sorted(Path(folder).glob("part-*.parquet"))


def _load_spill(out: Path) -> Run:
    parts = spill_parts(out)
    frames = [_read_frame(part) for part in parts]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    steps = frame["step"].to_numpy()
    about: dict[str, Any] = {"model": {"class": "model", "parameters": 0}, "recorder": {}}
    with contextlib.suppress(OSError, ValueError):  # what the recorder said at attach
        described = json.loads((out / "spill.json").read_text())
        if isinstance(described, dict):
            about |= {k: v for k, v in described.items() if isinstance(v, dict)}
    verdicts = diagnose(frame, model=about["model"]) if len(frame) else []
    info = {
        "format": FORMAT,
        "name": out.name,
        **about,
        "spill": {"parts": len(parts)},
        "steps": {"recorded": int(len(np.unique(steps)))}
        | ({"first": int(steps.min()), "last": int(steps.max())} if len(steps) else {}),
        "verdicts": [_jsonable(v.to_dict()) for v in verdicts],
    }
    return Run(out, frame, info)


def is_run_folder(path: Path) -> bool:
    """Whether `path` is a run folder (run.json) or a recorder's spill folder (parts)."""
    return (path / "run.json").is_file() or (path.is_dir() and bool(spill_parts(path)))


def _write_frame(path: Path, parts: list[Path], held: pd.DataFrame) -> None:
    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("layer", pa.string()),
            ("kind", pa.string()),
            ("stat", pa.string()),
            ("value", pa.float64()),
        ]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches():
                writer.write_table(pa.Table.from_batches([batch]).cast(schema))
        if len(held):
            writer.write_table(pa.Table.from_pandas(held, schema, preserve_index=False))


def _steps(path: Path) -> dict[str, int]:
    steps = pq.read_table(path, columns=["step"]).column("step").to_numpy()
    if not len(steps):
        return {"recorded": 0}
    return {
        "recorded": int(len(np.unique(steps))),
        "first": int(steps.min()),
        "last": int(steps.max()),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value
