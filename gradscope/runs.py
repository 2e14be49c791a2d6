"""Your own run as a folder: frame.parquet, run.json (model, settings, versions, verdicts) and
report.html; loading it back; and the diff of two runs, for CI after an architecture change.

    run/
      frame.parquet   every recorded row (step, layer, kind, stat, value)
      run.json        what was recorded and how, and the verdicts at the last step
      report.html     the run report (gradscope.report.run)
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gradscope import frame as fr
from gradscope.diagnose import SEVERITIES, Verdict, diagnose
from gradscope.files import atomic_write
from gradscope.schema import COLUMNS, Kind, Stat

FORMAT = 1  # run.json's "format": bumped when the folder's layout changes


class RunError(ValueError):
    """A folder that is not a readable run; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Run:
    """A saved run: its frame, what run.json says, and its verdicts."""

    path: Path
    frame: pd.DataFrame
    info: dict[str, Any]

    @property
    def verdicts(self) -> list[Verdict]:
        return [Verdict(**v) for v in self.info.get("verdicts", [])]


def save_run(recorder: Any, path: str | Path, name: str | None = None, report: bool = True) -> Path:
    """Writes a recorder's run folder (see the module docstring); returns its path.

    A spilled recording is copied part by part into frame.parquet; the verdicts are over the
    whole recording (gradscope.diagnose).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    parts = list(getattr(recorder, "spill_parts", []))
    held = recorder.held_frame() if parts else recorder.to_frame()
    _write_frame(out / "frame.parquet", parts, held)
    whole = pd.read_parquet(out / "frame.parquet") if parts else held
    verdicts = diagnose(whole) if len(whole) else []
    model = recorder.model_summary
    info = {
        "format": FORMAT,
        "name": name or out.name,
        "model": model,
        "recorder": recorder.settings(),
        "steps": _steps(out / "frame.parquet"),
        "versions": {
            "gradscope": _version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "verdicts": [_jsonable(v.to_dict()) for v in verdicts],
    }
    atomic_write(out / "run.json", lambda p: p.write_text(json.dumps(info, indent=2)))
    if report:
        from gradscope.report.run import render_run_report

        render_run_report(load_run(out))
    return out


def load_run(path: str | Path) -> Run:
    """Reads a run folder back.

    Raises:
        RunError: no such folder, not a run folder, or a damaged run.json or frame.parquet;
            the message names the file.
    """
    out = Path(path)
    if not out.is_dir():
        raise RunError(f"{out} is not a folder")
    info_path, frame_path = out / "run.json", out / "frame.parquet"
    if not info_path.is_file() or not frame_path.is_file():
        raise RunError(f"{out} is not a run folder (it needs run.json and frame.parquet)")
    try:
        info = json.loads(info_path.read_text())
        if not isinstance(info, dict) or "format" not in info:
            raise ValueError("no 'format' field")
    except (ValueError, UnicodeDecodeError) as e:
        raise RunError(f"{info_path} is damaged ({e})") from None
    try:
        frame = pd.read_parquet(frame_path)
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise RunError(f"{frame_path} is not a readable Parquet file ({e})") from None
    if list(frame.columns) != list(COLUMNS):
        raise RunError(f"{frame_path} has columns {list(frame.columns)}, expected {list(COLUMNS)}")
    return Run(out, frame, info)


def is_run_folder(path: Path) -> bool:
    return (path / "run.json").is_file()


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

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for part in parts:
                for batch in pq.ParquetFile(part).iter_batches():
                    writer.write_table(pa.Table.from_batches([batch]).cast(schema))
            if len(held):
                writer.write_table(pa.Table.from_pandas(held, schema, preserve_index=False))

    atomic_write(path, write)


def _steps(path: Path) -> dict[str, int]:
    steps = pq.read_table(path, columns=["step"]).column("step").to_numpy()
    if not len(steps):
        return {"recorded": 0}
    return {
        "recorded": int(len(np.unique(steps))),
        "first": int(steps.min()),
        "last": int(steps.max()),
    }


def _version() -> str:
    from gradscope import __version__

    return __version__


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


# -- diff ----------------------------------------------------------------------------------

# a statistic that changed by more than this factor is listed as changed
CHANGE_FACTOR = 2.0
_COMPARED = [
    (Kind.PARAM_GRAD, Stat.NORM),
    (Kind.UPDATE, Stat.RATIO),
    (Kind.ACTIVATION, Stat.RMS),
    (Kind.ACTIVATION, Stat.ZERO_FRAC),
    (Kind.ACTIVATION_GRAD, Stat.NORM),
]


@dataclass(frozen=True)
class RunDiff:
    """How run B differs from run A, layer by layer, at their last common step."""

    step: int
    changes: pd.DataFrame  # layer, kind, stat, a, b, ratio: the rows that moved most
    appeared: list[Verdict]  # in B, not in A
    disappeared: list[Verdict]  # in A, not in B

    @property
    def worse(self) -> bool:
        """A warning or error in B that A did not have."""
        return any(
            SEVERITIES.index(v.severity) >= SEVERITIES.index("warning") for v in self.appeared
        )


def diff_runs(a: Run, b: Run) -> RunDiff:
    """Compares two runs, aligned by layer name and step (their last common step).

    Raises:
        RunError: the runs share no recorded step or no layer.
    """
    common = sorted(set(a.frame["step"]) & set(b.frame["step"]))
    if not common:
        raise RunError(f"{a.path} and {b.path} share no recorded step")
    step = int(common[-1])
    rows = []
    for kind, stat in _COMPARED:
        sa = fr.select(a.frame, kind, stat, step=step).set_index("layer")["value"]
        sb = fr.select(b.frame, kind, stat, step=step).set_index("layer")["value"]
        for layer in sa.index.intersection(sb.index):
            rows.append((layer, str(kind), str(stat), float(sa[layer]), float(sb[layer])))
    layers_a = set(a.frame["layer"]) - {"*"}
    layers_b = set(b.frame["layer"]) - {"*"}
    if not layers_a & layers_b:
        raise RunError(
            f"{a.path} and {b.path} have no layer in common: not runs of the same model "
            f"({len(layers_a)} and {len(layers_b)} layers)"
        )
    changes = pd.DataFrame(rows, columns=["layer", "kind", "stat", "a", "b"])
    a_values, b_values = changes["a"].to_numpy(), changes["b"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a_values == b_values, 1.0, b_values / a_values)
        moved = np.abs(np.log(ratio))
    changes["ratio"] = ratio
    changes = changes.assign(moved=moved)
    changes = changes[(changes["moved"] > math.log(CHANGE_FACTOR)) | ~np.isfinite(moved)]
    changes = changes.sort_values("moved", ascending=False, na_position="first")
    ids_a = {(v.id, v.severity) for v in a.verdicts}
    ids_b = {(v.id, v.severity) for v in b.verdicts}
    appeared = [v for v in b.verdicts if (v.id, v.severity) not in ids_a and v.id != "healthy"]
    disappeared = [v for v in a.verdicts if (v.id, v.severity) not in ids_b and v.id != "healthy"]
    return RunDiff(
        step, changes.drop(columns="moved").reset_index(drop=True), appeared, disappeared
    )
