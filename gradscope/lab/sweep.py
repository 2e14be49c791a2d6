"""The depth sweep: (variant, depth, seed) runs, each recorded and saved as it finishes.

Every file of a sweep folder is written through gradscope.files.atomic_write; each run's row
is read back through gradscope.formats; a folder is locked while a sweep writes to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gradscope import formats
from gradscope import frame as fr
from gradscope.diagnose import diagnose
from gradscope.files import atomic_write, atomic_write_text, describe, pid_alive
from gradscope.lab import theory
from gradscope.lab.data import Dataset
from gradscope.lab.models import Variant, build_model
from gradscope.lab.train import TrainConfig, total_steps, train
from gradscope.recorder import Recorder

DEFAULT_VARIANTS = ("plain", "residual", "preln", "postln", "rmsnorm")
DEFAULT_DEPTH_COUNT = 6
# runs.csv's columns: a sweep row's fields (gradscope.formats), but its version and details
RUN_COLUMNS = [f.name for f in formats.SWEEP_ROW_FIELDS if f.name not in ("format", "details")]


class SweepError(ValueError):
    """A sweep configuration or output folder that cannot be used; the message says why."""


def default_depths(lo: int, hi: int, count: int = DEFAULT_DEPTH_COUNT) -> list[int]:
    """Log-spaced integer depths from lo to hi, both ends included.

    Example:
        >>> default_depths(2, 100)
        [2, 4, 10, 21, 46, 100]
    """
    if lo < 1 or hi < 1:
        raise SweepError(f"depths must be >= 1, got --min {lo} --max {hi}")
    if lo > hi:
        raise SweepError(f"--min ({lo}) is above --max ({hi})")
    points = np.geomspace(lo, hi, num=min(count, hi - lo + 1))
    return sorted({lo, hi, *(int(round(p)) for p in points)})


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep; saved as config.json so it can be rerun exactly."""

    depths: tuple[int, ...]
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    width: int = 128
    activation: str = "relu"
    init: str = "default"
    optimizer: str = "sgd"
    lr: float | None = None
    steps: int | None = 500
    epochs: int = 1
    batch_size: int = 128
    seeds: tuple[int, ...] = (0,)
    dataset: str = "mnist"
    every: int = 20
    eval_train_size: int = 2000

    def validate(self) -> None:
        if not self.depths or min(self.depths) < 1:
            raise SweepError(f"depths must be integers >= 1, got {list(self.depths)}")
        if not self.variants:
            raise SweepError("no variants given")
        for v in self.variants:
            if v not in {x.value for x in Variant}:
                choices = ", ".join(x.value for x in Variant)
                raise SweepError(f"unknown variant {v!r}; choose from {choices}")
        if self.every < 1:
            raise SweepError(f"every must be >= 1, got {self.every}")
        if not self.seeds:
            raise SweepError("no seeds given")
        if self.width < 1:
            raise SweepError(f"width must be >= 1, got {self.width}")
        try:
            self.train_config(0).validate()
            build_model(self.variants[0], 1, 1, self.activation, self.init)
        except ValueError as e:
            raise SweepError(str(e)) from None

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            optimizer=self.optimizer,
            lr=self.lr,
            epochs=self.epochs,
            steps=self.steps,
            batch_size=self.batch_size,
            seed=seed,
            eval_train_size=self.eval_train_size,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepConfig:
        data = dict(data)
        for key in ("depths", "variants", "seeds"):
            data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class RunSpec:
    variant: str
    depth: int
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.variant}-d{self.depth}-s{self.seed}"


def plan_runs(config: SweepConfig) -> list[RunSpec]:
    """All runs, deepest first so that the long ones start early and the workers end together."""
    runs = [RunSpec(v, d, s) for v in config.variants for d in config.depths for s in config.seeds]
    return sorted(runs, key=lambda r: (-r.depth, config.variants.index(r.variant), r.seed))


def run_one(
    spec: RunSpec,
    config: SweepConfig,
    data: Dataset,
    progress: Callable[[int, int, float], None] | None = None,
    record: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Trains and records one run; returns its long-form frame and its row of the run table."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.variant, spec.depth, config.width, config.activation, config.init)
    tc = config.train_config(spec.seed)
    n_steps = total_steps(tc, len(data.y_train))

    def every(step: int) -> bool:
        return step % config.every == 0 or step == n_steps - 1

    recorder = Recorder(every=every) if record else None
    result = train(model, data, tc, recorder=recorder, progress=progress)
    frame = recorder.to_frame() if recorder is not None else pd.DataFrame()
    flow = fr.flow_summary(frame) if len(frame) else pd.DataFrame(columns=["step"])
    first = flow.iloc[0] if len(flow) else None
    last = flow.iloc[-1] if len(flow) else None
    tail = [v for v in result.losses[-20:] if math.isfinite(v)]
    init = diagnose(frame, step=int(frame["step"].min())) if len(frame) else []
    end = diagnose(frame) if len(frame) else []
    row: dict[str, Any] = {
        "variant": spec.variant,
        "depth": spec.depth,
        "seed": spec.seed,
        "width": config.width,
        "activation": config.activation,
        "init": config.init,
        "optimizer": config.optimizer,
        "lr": tc.resolved_lr,
        "steps": result.steps,
        "batch_size": tc.batch_size,
        "train_acc": result.train_acc,
        "test_acc": result.test_acc,
        "train_loss": result.train_loss,
        "test_loss": result.test_loss,
        "final_loss": float(np.mean(tail)) if tail else math.nan,
        "grad_ratio_init": first["grad_ratio"] if first is not None else math.nan,
        "grad_ratio_end": last["grad_ratio"] if last is not None else math.nan,
        "grad_decay_init": first["grad_decay"] if first is not None else math.nan,
        "grad_decay_end": last["grad_decay"] if last is not None else math.nan,
        # the mean-field prediction for plain stacks (gradscope.lab.theory); none for residual ones
        "grad_decay_theory": theory.decay_per_layer(
            config.activation, config.init, config.width, "param_grad"
        )
        if spec.variant == Variant.PLAIN
        else math.nan,
        "diverged": result.diverged,
        "seconds": result.seconds,
        "verdicts_init": ";".join(v.id for v in init),
        "verdicts": ";".join(v.id for v in end),
        "details": {"init": [v.to_dict() for v in init], "end": [v.to_dict() for v in end]},
    }
    if len(frame):
        frame.insert(0, "seed", spec.seed)
        frame.insert(0, "depth", spec.depth)
        frame.insert(0, "variant", spec.variant)
    loss = pd.DataFrame({"step": range(len(result.losses)), "loss": result.losses})
    loss.insert(0, "seed", spec.seed)
    loss.insert(0, "depth", spec.depth)
    loss.insert(0, "variant", spec.variant)
    return frame, {**row, "_losses": loss}


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
            spec = RunSpec(row["variant"], row["depth"], row["seed"])
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


class SweepResults(NamedTuple):
    """A sweep folder's merged frame, run table and losses (a plain 3-tuple to unpack)."""

    frame: pd.DataFrame
    runs: pd.DataFrame
    losses: pd.DataFrame

    def _repr_html_(self) -> str:
        from gradscope.integrations.notebook import sweep_html

        return sweep_html(self)


def load_results(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The merged frame, run table and losses of every finished run in a sweep folder.

    Raises:
        SweepError: a run's files are damaged; the message names them.
    """
    runs_dir = out / "runs"
    found, damaged = scan_runs(out, read_config(out))
    if damaged:
        raise SweepError("; ".join(damaged.values()) + f"; rerun with --resume {out} to redo")
    ids = sorted(found)
    rows = [found[i] for i in ids]
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS)
    frames = [pd.read_parquet(runs_dir / f"{i}.parquet") for i in ids]
    frames = [f for f in frames if len(f)]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    loss_files = [runs_dir / f"{i}.loss.parquet" for i in ids]
    losses = [pd.read_parquet(p) for p in loss_files if p.exists()]
    loss = pd.concat(losses, ignore_index=True) if losses else pd.DataFrame()
    if len(runs):
        order = {v: i for i, v in enumerate(Variant)}
        runs = runs.sort_values(
            ["variant", "depth", "seed"], key=lambda s: s.map(order) if s.name == "variant" else s
        )
        runs = runs.reset_index(drop=True)
    return SweepResults(frame, runs, loss)


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


def write_outputs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Writes frame.parquet and runs.csv of a sweep folder from its saved runs; returns the
    merged frame, run table and losses (see load_results)."""
    results = load_results(out)
    frame, runs, _ = results
    atomic_write(out / "frame.parquet", lambda p: frame.to_parquet(p, index=False))
    atomic_write(out / "runs.csv", lambda p: runs.to_csv(p, index=False))
    return results


def deepest_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The deepest run of each variant (its first seed), in the variants' order of appearance:
    what the report's per-variant figures and verdicts show."""
    first_seed = runs[runs["seed"] == runs.groupby("variant")["seed"].transform("min")]
    return first_seed.sort_values("depth").groupby("variant", sort=False).tail(1)


def deepest_verdicts(out: Path, runs: pd.DataFrame) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(phase, variant, depth, verdict) of the deepest run of each variant, at init ("init")
    and after training ("end")."""
    found = []
    for phase in ("init", "end"):
        for r in deepest_runs(runs).itertuples():
            run_id = RunSpec(str(r.variant), int(r.depth), int(r.seed)).run_id
            path = out / "runs" / f"{run_id}.json"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                details = formats.check_sweep_row(formats.read_json(path), path)["details"]
            found += [(phase, str(r.variant), int(r.depth), v) for v in details[phase]]
    return found
