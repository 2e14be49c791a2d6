"""Your own run as a folder: frame.parquet, run.json (model, settings, versions, verdicts) and
report.html; loading it back; and the diff of two runs, for CI after an architecture change.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gradscope import formats
from gradscope import frame as fr
from gradscope.diagnose import SEVERITIES, Verdict, diagnose
from gradscope.files import file_digest, named, pid_alive, replace_dir
from gradscope.schema import COLUMNS, TOTAL, Kind, Stat, VerdictId
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
    verdicts = diagnose(whole) if len(whole) else []
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


def _read_rows(path: Path) -> int:
    try:
        return int(pq.read_metadata(path).num_rows)
    except OSError as e:
        if e.errno is not None:
            raise named(e, path) from e
        raise RunError(f"{path} is not a readable Parquet file ({e})") from None
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise RunError(f"{path} is not a readable Parquet file ({e})") from None


def _read_frame(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except OSError as e:
        if e.errno is not None:
            raise named(e, path) from e
        raise RunError(f"{path} is not a readable Parquet file ({e})") from None
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise RunError(f"{path} is not a readable Parquet file ({e})") from None
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
    verdicts = diagnose(frame) if len(frame) else []
    steps = frame["step"].to_numpy()
    about: dict[str, Any] = {"model": {"class": "model", "parameters": 0}, "recorder": {}}
    with contextlib.suppress(OSError, ValueError):  # what the recorder said at attach
        described = json.loads((out / "spill.json").read_text())
        if isinstance(described, dict):
            about |= {k: v for k, v in described.items() if isinstance(v, dict)}
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


# -- diff ----------------------------------------------------------------------------------

# a statistic that changed by more than this factor is listed as changed
CHANGE_FACTOR = 2.0
# a verdict in both runs is worse in B when its severity rises, or when its measure (below)
# moves the bad way by more than this factor (e.g. a first/last ratio 1e-4 -> 1e-6)
WORSE_FACTOR = 10.0
# the evidence number that says how bad a verdict is, and which way is worse (+1: larger);
# verdicts over a set of layers are measured by how many layers they name
MEASURES: dict[str, tuple[str, int]] = {
    VerdictId.VANISHING_GRADIENTS: ("median_ratio", -1),
    VerdictId.EXPLODING_GRADIENTS: ("first_last_ratio", +1),
    VerdictId.GRADIENT_SPIKE: ("gradient_jump", +1),
    VerdictId.LR_TOO_HIGH: ("update_ratio", +1),
}
_COMPARED = [
    (Kind.PARAM_GRAD, Stat.NORM),
    (Kind.UPDATE, Stat.RATIO),
    (Kind.ACTIVATION, Stat.RMS),
    (Kind.ACTIVATION, Stat.ZERO_FRAC),
    (Kind.ACTIVATION_GRAD, Stat.NORM),
]


@dataclass(frozen=True)
class Worsened:
    """A verdict both runs have, worse in B: the two, and by what factor its measure moved
    the bad way (inf when its severity rose)."""

    a: Verdict
    b: Verdict
    measure: str
    factor: float


@dataclass(frozen=True)
class RunDiff:
    """How run B differs from run A, layer by layer, at their last common step."""

    step: int
    changes: pd.DataFrame  # layer, kind, stat, a, b, ratio: the rows that moved most
    appeared: list[Verdict]  # in B, not in A
    disappeared: list[Verdict]  # in A, not in B
    worsened: list[Worsened] = field(default_factory=list)  # in both, worse in B
    only_a: list[str] = field(default_factory=list)  # layers of A with no match in B
    only_b: list[str] = field(default_factory=list)  # layers of B with no match in A
    aligned: str = ""  # how names were aligned ("" when they matched as they are)
    matched: int = 0  # layers compared

    @property
    def worse(self) -> bool:
        """A warning or error in B that A did not have, or one of A's got worse in B."""
        new = any(
            SEVERITIES.index(v.severity) >= SEVERITIES.index("warning") for v in self.appeared
        )
        return new or bool(self.worsened)


def _name_prefix(layers: set[str]) -> str:
    """The first dotted name part every layer shares ("model." under Lightning), or ""."""
    heads = {name.partition(".")[0] for name in layers if "." in name}
    if len(heads) == 1 and all("." in name for name in layers):
        return heads.pop() + "."
    return ""


def _strip(frame: pd.DataFrame, prefix: str) -> pd.DataFrame:
    if not prefix:
        return frame
    layer = frame["layer"].astype(str)
    return frame.assign(layer=layer.where(~layer.str.startswith(prefix), layer.str[len(prefix) :]))


def _align(a: pd.DataFrame, b: pd.DataFrame) -> tuple[str, str]:
    """The prefixes to strip from A's and B's layer names so that most layers match: a
    LightningModule's `model.` against the same network trained in a plain loop."""
    la, lb = set(a["layer"]) - {TOTAL}, set(b["layer"]) - {TOTAL}
    pa, pb = _name_prefix(la), _name_prefix(lb)

    def strip(names: set[str], p: str) -> set[str]:
        return {n[len(p) :] if p and n.startswith(p) else n for n in names}

    best, choice = len(la & lb), ("", "")
    for cand in ((pa, ""), ("", pb), (pa, pb)):
        overlap = len(strip(la, cand[0]) & strip(lb, cand[1]))
        if overlap > best:
            best, choice = overlap, cand
    return choice


def _measure(v: Verdict, key: str) -> float:
    if key == "layers":
        return float(len(v.layers))
    try:
        return float(v.evidence.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan


def _worsened(a: list[Verdict], b: list[Verdict], factor: float) -> list[Worsened]:
    found = []
    first_a = {v.id: v for v in reversed(a)}
    for vb in b:
        va = first_a.get(vb.id)
        if va is None or vb.id == "healthy":
            continue
        if SEVERITIES.index(vb.severity) > SEVERITIES.index(va.severity):
            found.append(Worsened(va, vb, "severity", math.inf))
            continue
        key, sign = MEASURES.get(vb.id, ("layers", +1))
        x, y = _measure(va, key), _measure(vb, key)
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        bad, good = (y, x) if sign > 0 else (x, y)
        moved = math.inf if good == 0 and bad > 0 else (bad / good if good > 0 else 1.0)
        if moved > factor:
            found.append(Worsened(va, vb, key, moved))
    return found


def diff_runs(
    a: Run, b: Run, strip_prefix: str | None = None, worse_factor: float = WORSE_FACTOR
) -> RunDiff:
    """Compares two runs, aligned by layer name and step (their last common step).

    Layer names are aligned first: `strip_prefix` is removed from both runs' names; without
    it, a first name part shared by every layer of one run (`model.` under Lightning) is
    removed where that matches more layers. Layers left without a match are listed.

    Raises:
        RunError: the runs share no recorded step or no layer.
    """
    common = sorted(set(a.frame["step"]) & set(b.frame["step"]))
    if not common:
        raise RunError(f"{a.path} and {b.path} share no recorded step")
    step = int(common[-1])
    fa, fb = fr.select(a.frame, step=step), fr.select(b.frame, step=step)
    if strip_prefix:
        pa = pb = strip_prefix
    else:
        pa, pb = _align(fa, fb)
    fa, fb = _strip(fa, pa), _strip(fb, pb)
    aligned = ", ".join(
        f"'{p}' stripped from {which}'s layer names" for p, which in ((pa, "A"), (pb, "B")) if p
    )
    rows = []
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    for kind, stat in _COMPARED:
        sa = fr.select(fa, kind, stat).set_index("layer")["value"]
        sb = fr.select(fb, kind, stat).set_index("layer")["value"]
        seen_a |= set(sa.index) - {TOTAL}
        seen_b |= set(sb.index) - {TOTAL}
        for layer in sa.index.intersection(sb.index):
            rows.append((layer, str(kind), str(stat), float(sa[layer]), float(sb[layer])))
    layers_a = set(fa["layer"]) - {TOTAL}
    layers_b = set(fb["layer"]) - {TOTAL}
    if not layers_a & layers_b:
        raise RunError(
            f"{a.path} and {b.path} have no layer in common: not runs of the same model "
            f"({len(layers_a)} and {len(layers_b)} layers; pass --strip-prefix if one run's "
            "names carry a wrapper's prefix)"
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
    same_a = {v.id for v in a.verdicts}
    same_b = {v.id for v in b.verdicts}
    # a verdict whose severity changed is 'worsened' or better, not gone and new
    appeared = [v for v in b.verdicts if v.id not in same_a and v.id != "healthy"]
    disappeared = [v for v in a.verdicts if v.id not in same_b and v.id != "healthy"]
    return RunDiff(
        step,
        changes.drop(columns="moved").reset_index(drop=True),
        appeared,
        disappeared,
        _worsened(a.verdicts, b.verdicts, worse_factor),
        sorted(seen_a - seen_b),
        sorted(seen_b - seen_a),
        aligned,
        len(seen_a & seen_b),
    )
