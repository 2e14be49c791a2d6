"""A sweep folder: config.json, each finished run's files under runs/ (its row marks it
finished), the lock held while a sweep writes there, resume, and the merged outputs.

Every file is written through gradscope.files.atomic_write; each run's row is read back
through gradscope.formats.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gradscope import formats
from gradscope.files import atomic_write, atomic_write_text, describe, pid_alive
from gradscope.lab.models import Variant
from gradscope.lab.sweep.config import RunSpec, SweepConfig, SweepError, plan_runs
from gradscope.lab.sweep.result import SweepResult

# runs.csv's columns: a sweep row's fields (gradscope.formats), but its version and details
RUN_COLUMNS = [f.name for f in formats.SWEEP_ROW_FIELDS if f.name not in ("format", "details")]


# -- saving ------------------------------------------------------------------------------


def store_run(out: Path, spec: RunSpec, frame: pd.DataFrame, row: dict[str, Any]) -> None:
    """Stores one finished sweep run in the sweep folder: its frame, losses, then its row (the
    row marks it finished)."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    losses = row.pop("_losses")
    atomic_write(runs / f"{spec.run_id}.parquet", lambda p: frame.to_parquet(p, index=False))
    atomic_write(runs / f"{spec.run_id}.loss.parquet", lambda p: losses.to_parquet(p, index=False))
    row = {"format": formats.SWEEP_ROW_FORMAT, **row}
    atomic_write_text(runs / f"{spec.run_id}.json", json.dumps(row, default=float))


def scan_runs(
    out: Path, config: SweepConfig | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The finished runs of a sweep folder (id -> its row), and the damaged ones (id -> what
    is wrong, naming the file and field): a row that is not JSON or not a run's row
    (gradscope.formats), a run file that cannot be read, or, given `config`, a run that is
    not one of its runs."""
    finished, damaged = {}, {}
    planned = {r.run_id for r in plan_runs(config)} if config is not None else None
    for path in sorted((out / "runs").glob("*.json")):
        run_id = path.name[: -len(".json")]
        try:
            with warnings.catch_warnings():  # unknown fields: not worth a note per run
                warnings.simplefilter("ignore")
                row = formats.check_sweep_row(formats.read_json(path), path)
            spec = RunSpec.of(row)
            if spec.run_id != run_id:
                raise formats.FormatError(f"{path} holds the row of run {spec.run_id}")
            if planned is not None and run_id not in planned:
                raise formats.FormatError(
                    f"{path} is not a run of this sweep's config.json (variants, depths, "
                    "seeds); move it out of runs/"
                )
            for part in (f"{run_id}.parquet", f"{run_id}.loss.parquet"):
                pq.read_metadata(out / "runs" / part)
        except formats.FormatError as e:
            damaged[run_id] = str(e)
            continue
        except (ValueError, OSError, pa.ArrowException) as e:
            reason = describe(e) if isinstance(e, OSError) and e.strerror else str(e)
            damaged[run_id] = f"{path.parent / run_id}.* is damaged ({reason})"
            continue
        finished[run_id] = row
    return finished, damaged


def finished_runs(out: Path) -> set[str]:
    """Ids of the runs saved whole (damaged ones are run again on resume)."""
    return set(scan_runs(out)[0])


def load_sweep(out: Path) -> SweepResult:
    """A sweep folder's finished runs as one SweepResult: the thin loader between a folder and
    the reports (`gradscope report`, the page rewritten as runs finish).

    Raises:
        SweepError: no config.json, or a run's files are damaged; the message names them.
    """
    runs_dir = out / "runs"
    config = read_config(out)
    found, damaged = scan_runs(out, config)
    if damaged:
        raise SweepError("; ".join(damaged.values()) + f"; rerun with --resume {out} to redo")
    ids = sorted(found)
    order = {v: i for i, v in enumerate(Variant)}
    runs = pd.DataFrame([found[i] for i in ids], columns=RUN_COLUMNS).sort_values(
        ["variant", "depth", "seed"], key=lambda s: s.map(order) if s.name == "variant" else s
    )
    frames = [pd.read_parquet(runs_dir / f"{i}.parquet") for i in ids]
    frames = [f for f in frames if len(f)]
    losses = [pd.read_parquet(runs_dir / f"{i}.loss.parquet") for i in ids]
    return SweepResult(
        config=config,
        runs=runs.reset_index(drop=True),
        frame=pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        losses=pd.concat(losses, ignore_index=True) if losses else pd.DataFrame(),
        details={i: found[i]["details"] for i in ids},
        folder=out,
    )


def read_config(out: Path) -> SweepConfig:
    """A sweep folder's config.json.

    Raises:
        SweepError: there is none, or it is damaged; the message names it.
    """
    config_path = out / "config.json"
    if not config_path.is_file():
        raise SweepError(f"{out} holds no config.json: not a sweep folder")
    try:
        data = formats.read_json(config_path)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        config = SweepConfig.from_json(data)
        config.validate()
        return config
    except formats.FormatError as e:
        raise SweepError(f"{e}; start a new --out") from None
    except (ValueError, TypeError, KeyError) as e:
        raise SweepError(f"{config_path} is damaged ({e}); start a new --out") from None
    except OSError as e:
        raise SweepError(f"{config_path}: {e.strerror or e}") from None


LOCK = ".lock"
_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # atomic_write's temporary names


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Holds the folder's lock while a sweep writes to it; a second sweep into the same
    folder is refused (SweepError). The lock goes with its process, however it ends."""
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SweepError(f"cannot write to {out}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise SweepError(
                f"{out} is being written by another sweep (pid {holder}); wait for it to "
                "end, or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def remove_stale_files(out: Path) -> None:
    """Removes the temporary files that killed writers left in a sweep folder."""
    for folder in (out, out / "runs"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            m = _TMP.match(entry.name)
            if m and not pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    entry.unlink()


def prepare_out(out: Path, config: SweepConfig, resume: bool) -> None:
    """Creates (or, resuming, checks) the output folder and its config.json."""
    config_path = out / "config.json"
    if resume:
        if not config_path.is_file():
            raise SweepError(f"{out} holds no config.json: not a sweep folder to resume")
        saved = read_config(out)
        remove_stale_files(out)
        if saved != config:
            diff = [k for k in config.to_json() if getattr(saved, k) != getattr(config, k)]
            raise SweepError(
                f"{out} was made by another configuration (differs in: {', '.join(diff)}); "
                "rerun with the same options or a new --out"
            )
        return
    if out.exists() and any(e.name != LOCK for e in out.iterdir()):
        raise SweepError(f"{out} exists and is not empty; use --resume {out} or a new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, json.dumps(config.to_json(), indent=2))
    except OSError as e:
        raise SweepError(f"cannot write to {out}: {describe(e)}") from None


def write_outputs(out: Path) -> SweepResult:
    """Writes frame.parquet and runs.csv of a sweep folder from its saved runs; returns them
    as its SweepResult (see load_sweep)."""
    result = load_sweep(out)
    atomic_write(out / "frame.parquet", lambda p: result.frame.to_parquet(p, index=False))
    atomic_write(out / "runs.csv", lambda p: result.runs.to_csv(p, index=False))
    return result
