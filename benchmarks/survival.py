"""The fault probe: what a long training job meets (kill -9 during a save or a spill, a full
disk, hand-damaged files, a loop that rebuilds its optimizer or model, bad CLI input, a
stopped sweep), case by case, each outcome counted as

    clear      a clear error: the library raises one error naming the file (and field), or
               the CLI exits 2 with one line
    handled    the right result: the old or the new run whole, nothing lost, one note
    traceback  an unexpected exception (a CLI traceback, or an error from inside the
               user's opt.step())
    silent     a wrong or lost result without a word (a mixed folder accepted, steps lost)

    python benchmarks/survival.py [--group NAME] [--quick]

Kill cases run a child (tests/faults.py) that SIGKILLs itself at a chosen point; the full
disk is an injected OSError(ENOSPC) (no small filesystem can be mounted without root).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import nn
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gradscope as gs  # noqa: E402
from gradscope.cli import app  # noqa: E402
from gradscope.runs import RunError  # noqa: E402

CLEAR, HANDLED, TRACEBACK, SILENT = "clear", "handled", "traceback", "silent"
runner = CliRunner()
GROUPS: dict[str, list[tuple[str, Callable[[Path], str]]]] = {}


def case(group: str, name: str) -> Callable[[Callable[[Path], str]], Callable[[Path], str]]:
    def register(fn: Callable[[Path], str]) -> Callable[[Path], str]:
        GROUPS.setdefault(group, []).append((name, fn))
        return fn

    return register


def enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def record(steps: int = 4, seed: int = 0, **kwargs: Any) -> gs.Recorder:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gs.watch(model, optimizer=opt, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
    return rec


def cli(args: list[str], ok: tuple[int, ...] = (0,)) -> str:
    """A CLI call's outcome: exit in `ok` -> handled; 2 with one error line -> clear."""
    result = runner.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return TRACEBACK
    if "Traceback" in result.output:
        return TRACEBACK
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if result.exit_code in ok:
        return HANDLED
    if result.exit_code == 2 and len(errors) == 1:
        return CLEAR
    return SILENT  # a damaged input read as a result, or an exit code that means another thing


def load(path: Path, expect_steps: list[list[int]] | None = None) -> str:
    """load_run's outcome: a RunError -> clear; a run whose steps are one of `expect_steps`
    -> handled; anything else read -> silent."""
    try:
        run = gs.load_run(path)
    except RunError:
        return CLEAR
    except Exception:
        return TRACEBACK
    steps = sorted(int(s) for s in run.frame["step"].unique())
    expected = expect_steps is None or steps in expect_steps
    return HANDLED if expected and run.info["steps"].get("recorded") == len(steps) else SILENT


def child(*args: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "faults.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode


# -- kill -9 during rec.save() -------------------------------------------------------------

for _point in ("frame", "report", "exchange", "swapped"):

    def _kill_save(tmp: Path, point: str = _point) -> list[str]:
        out = tmp / "run"
        if child("save", str(out), point) != -9:
            return [SILENT]
        finished = tmp / "finished"
        record(10).save(finished)  # what a finished save of steps 0-9 holds, for diff
        results = [
            load(out, [list(range(5)), list(range(10))]),
            cli(["report", str(out)]),
            cli(["diff", str(finished), str(out)], ok=(0, 1)),
        ]
        leftovers = [p.name for p in out.iterdir()]
        if sorted(leftovers) != ["frame.parquet", "report.html", "run.json"]:
            results.append(SILENT)
        return results

    case("kill during save", f"SIGKILL at {_point}")(_kill_save)  # type: ignore[arg-type]


# -- kill -9 while spilling ----------------------------------------------------------------


@case("spill kill", "SIGKILL between parts (every=10, kill at step 300)")
def _spill_kill(tmp: Path) -> list[str]:
    folder = tmp / "spill"
    if child("spill", str(folder), "step") != -9:
        return [SILENT]
    out = [load(folder)]
    steps = sorted(gs.load_run(folder).frame["step"].unique()) if out[0] == HANDLED else []
    # lost: more than ~0.5 s of steps (spill_seconds=0.3 at 5 ms a step = 60 steps)
    out.append(HANDLED if steps and steps[-1] >= 240 else SILENT)
    out.append(cli(["report", str(folder)]))
    return out


@case("spill kill", "SIGKILL inside a part's write")
def _spill_kill_part(tmp: Path) -> list[str]:
    folder = tmp / "spill"
    if child("spill", str(folder), "part") != -9:
        return [SILENT]
    out = [load(folder), cli(["report", str(folder)])]
    try:  # the next recording in that folder: a clear refusal, not a mix
        record(2, spill_to=folder)
        out.append(SILENT)
    except gs.RecorderError:
        out.append(CLEAR)
    return out


# -- a full disk -----------------------------------------------------------------------------


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@case("ENOSPC", "while spilling, inside opt.step()")
def _enospc_spill(tmp: Path) -> list[str]:
    folder = tmp / "spill"
    try:
        with patched(pd.DataFrame, "to_parquet", enospc), warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            rec = record(8, spill_to=folder, spill_steps=1)
    except OSError:
        return [TRACEBACK]  # the user's training died
    whole = sorted(rec.to_frame()["step"].unique()) == list(range(8))
    leftover = [p for p in folder.iterdir() if p.name != "spill.json"]
    rec.detach()
    return [HANDLED if whole and not leftover else SILENT, load(folder, [list(range(8))])]


@case("ENOSPC", "during rec.save() over an old run")
def _enospc_save(tmp: Path) -> list[str]:
    out = tmp / "run"
    record(3).save(out)
    before = (out / "run.json").read_text()
    rec = record(5)
    try:
        with patched(pq.ParquetWriter, "write_table", enospc):
            rec.save(out)
        return [SILENT]
    except OSError as e:
        named = e.filename is not None and str(out) in str(e.filename)
        kept = (out / "run.json").read_text() == before and len(list(tmp.iterdir())) == 1
        return [CLEAR if named and kept else SILENT]


@case("ENOSPC", "writing a report (CLI)")
def _enospc_report(tmp: Path) -> list[str]:
    import gradscope.report.run as report

    out = record(3).save(tmp / "run")

    def full(run: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "report.html"))

    with patched(report, "render_run_report", full):
        return [cli(["report", str(out)])]


TINY = ["--depths", "2,6", "--variants", "plain,preln", "--steps", "12", "--every", "4"]
TINY += ["--dataset", "synthetic", "--workers", "1"]


@case("ENOSPC", "writing a sweep's config.json (CLI), then the same --out")
def _enospc_config(tmp: Path) -> list[str]:
    out = tmp / "sweep"
    with patched(Path, "write_text", enospc):
        first = cli(["depth-sweep", *TINY, "--out", str(out)])
    return [first, cli(["depth-sweep", *TINY, "--out", str(out)])]


@case("ENOSPC", "saving a sweep run (CLI), then --resume")
def _enospc_sweep_run(tmp: Path) -> list[str]:
    out = tmp / "sweep"
    real = pd.DataFrame.to_parquet
    calls = Counter[str]()

    def fifth_fails(self: pd.DataFrame, path: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            enospc()
        return real(self, path, *a, **k)

    with patched(pd.DataFrame, "to_parquet", fifth_fails):
        first = cli(["depth-sweep", *TINY, "--out", str(out)])
    tmps = [p for p in (out / "runs").iterdir() if p.name.endswith(".tmp")]
    return [first, SILENT if tmps else HANDLED, cli(["depth-sweep", *TINY, "--resume", str(out)])]


# -- hand-damaged files ----------------------------------------------------------------------


def _edit(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


RUN_DAMAGE: dict[str, Callable[[Path, Path], None]] = {
    "truncated frame": lambda r, o: (r / "frame.parquet").write_bytes(
        (r / "frame.parquet").read_bytes()[:500]
    ),
    "frame of another run": lambda r, o: shutil.copy(o / "frame.parquet", r / "frame.parquet"),
    "same rows, one value changed": lambda r, o: (
        pd.read_parquet(r / "frame.parquet")
        .assign(value=lambda f: f["value"] * 1.5)
        .to_parquet(r / "frame.parquet", index=False)
    ),
    "empty run.json": lambda r, o: (r / "run.json").write_text(""),
    "run.json a list": lambda r, o: (r / "run.json").write_text("[]"),
    "verdict without severity": lambda r, o: _edit(
        r / "run.json", lambda i: i["verdicts"][0].pop("severity")
    ),
    "verdict without message": lambda r, o: _edit(
        r / "run.json", lambda i: i["verdicts"][0].pop("message")
    ),
    "verdict first_step a string": lambda r, o: _edit(
        r / "run.json", lambda i: i["verdicts"][0].update(first_step="3")
    ),
    "verdict layers a string": lambda r, o: _edit(
        r / "run.json", lambda i: i["verdicts"][0].update(layers="fc1")
    ),
    "verdict evidence a list": lambda r, o: _edit(
        r / "run.json", lambda i: i["verdicts"][0].update(evidence=[1])
    ),
    "unknown severity": lambda r, o: _edit(
        r / "run.json", lambda i: i["verdicts"][0].update(severity="fatal")
    ),
    "verdicts an object": lambda r, o: _edit(r / "run.json", lambda i: i.update(verdicts={})),
    "no model field": lambda r, o: _edit(r / "run.json", lambda i: i.pop("model")),
    "format a string": lambda r, o: _edit(r / "run.json", lambda i: i.update(format="2")),
    "no frame field": lambda r, o: _edit(r / "run.json", lambda i: i.pop("frame")),
    "frame rows a string": lambda r, o: _edit(
        r / "run.json", lambda i: i["frame"].update(rows="10")
    ),
}
RUN_NOTES: dict[str, Callable[[Path, Path], None]] = {
    "extra top-level field": lambda r, o: _edit(r / "run.json", lambda i: i.update(extra=1)),
    "extra verdict field": lambda r, o: _edit(
        r / "run.json", lambda i: i["verdicts"][0].update(confidence=0.5)
    ),
    "newer format": lambda r, o: _edit(r / "run.json", lambda i: i.update(format=9)),
}

for _name, _damage in {**RUN_DAMAGE, **RUN_NOTES}.items():

    def _damaged(tmp: Path, damage: Callable[[Path, Path], None] = _damage) -> list[str]:
        run, other = record(4).save(tmp / "run"), record(6, seed=1).save(tmp / "other")
        damage(run, other)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [
                load(run),
                cli(["report", str(run)]),
                cli(["diff", str(other), str(run)], ok=(0, 1)),
                cli(["diff", str(run), str(other)], ok=(0, 1)),
            ]

    wanted = CLEAR if _name in RUN_DAMAGE else HANDLED

    def _scored(tmp: Path, f: Callable[[Path], list[str]] = _damaged, w: str = wanted) -> Any:
        # a damaged file read as a run is silent; a note-worthy one refused is not "clear"
        return [o if o in (TRACEBACK, w) else SILENT for o in f(tmp)]

    case("damaged files", _name)(_scored)


@case("damaged files", "today's run folder (format 1)")
def _old_folder(tmp: Path) -> list[str]:
    return [load(REPO / "tests" / "data" / "run-format1", [[0, 2]])]


SWEEP_DAMAGE: dict[str, Callable[[Path], None]] = {
    "row depth mistyped": lambda s: _edit(
        s / "runs" / "plain-d2-s0.json", lambda r: r.update(depth="two")
    ),
    "row without test_acc": lambda s: _edit(
        s / "runs" / "plain-d2-s0.json", lambda r: r.pop("test_acc")
    ),
    "row details a list": lambda s: _edit(
        s / "runs" / "plain-d2-s0.json", lambda r: r.update(details=[])
    ),
    "row not JSON": lambda s: (s / "runs" / "plain-d2-s0.json").write_text("{"),
    "run frame truncated": lambda s: (s / "runs" / "plain-d2-s0.parquet").write_bytes(b"PAR1"),
    "empty config.json": lambda s: (s / "config.json").write_text(""),
    "config.json unknown key": lambda s: _edit(s / "config.json", lambda c: c.update(x=1)),
}


def _foreign(s: Path) -> None:
    for suffix in (".json", ".parquet", ".loss.parquet"):
        shutil.copy(s / "runs" / f"plain-d2-s0{suffix}", s / "runs" / f"plain-d3-s0{suffix}")
    _edit(s / "runs" / "plain-d3-s0.json", lambda r: r.update(depth=3))


SWEEP_DAMAGE["a run outside config.json"] = _foreign

_SWEEP: list[Path] = []


def _sweep_folder(tmp: Path) -> Path:
    if not _SWEEP:
        base = Path(tempfile.mkdtemp()) / "sweep"
        assert runner.invoke(app, ["depth-sweep", *TINY, "--out", str(base)]).exit_code == 0
        _SWEEP.append(base)
    shutil.copytree(_SWEEP[0], tmp / "sweep")
    return tmp / "sweep"


for _name, _sweep_damage in SWEEP_DAMAGE.items():

    def _damaged_sweep(tmp: Path, damage: Callable[[Path], None] = _sweep_damage) -> list[str]:
        folder = _sweep_folder(tmp)
        damage(folder)
        return [cli(["report", str(folder)])]

    case("damaged files", f"sweep: {_name}")(_damaged_sweep)


# -- the loops -------------------------------------------------------------------------------


def _loop_steps(build: Callable[[nn.Module, int], Any], steps: int = 9, **kw: Any) -> list[int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gs.watch(model, **kw) as rec:
            opt = None
            for step in range(steps):
                opt = build(model, step) or opt
                opt.zero_grad()
                model(torch.randn(5, 4)).sum().backward()
                opt.step()
    return sorted(int(s) for s in rec.to_frame()["step"].unique())


@case("optimizer rebuilt", "made again each epoch (found)")
def _rebuilt(tmp: Path) -> list[str]:
    steps = _loop_steps(
        lambda m, s: torch.optim.SGD(m.parameters(), lr=0.01) if s % 3 == 0 else None
    )
    return [HANDLED if steps == list(range(9)) else SILENT]


@case("optimizer rebuilt", "made again each epoch (given to watch)")
def _rebuilt_given(tmp: Path) -> list[str]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gs.watch(model, optimizer=opt) as rec:
            for step in range(9):
                if step % 3 == 0:
                    opt = torch.optim.Adam(model.parameters())
                opt.zero_grad()
                model(torch.randn(5, 4)).sum().backward()
                opt.step()
    notes = [w for w in caught if "closes the steps" in str(w.message)]
    whole = sorted(rec.to_frame()["step"].unique()) == list(range(9))
    return [HANDLED if whole and len(notes) == 1 else SILENT]


@case("optimizer rebuilt", "layer replaced, optimizer made again")
def _surgery(tmp: Path) -> list[str]:
    def build(model: nn.Module, step: int) -> Any:
        if step == 4:
            model[2] = nn.Linear(4, 2)
        if step in (0, 4):
            return torch.optim.SGD(model.parameters(), lr=0.01)
        return None

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gs.watch(model) as rec:
            opt: Any = None
            for step in range(8):
                opt = build(model, step) or opt
                opt.zero_grad()
                model(torch.randn(5, 4)).sum().backward()
                opt.step()
                if step == 4:
                    new_grad = float(model[2].weight.grad.norm())
    f = rec.to_frame()
    got = f[(f.step == 4) & (f.layer == "2.weight") & (f.kind == "param_grad") & (f.stat == "norm")]
    right = len(got) == 1 and abs(float(got["value"].iloc[0]) - new_grad) < 1e-5 * new_grad
    whole = sorted(f["step"].unique()) == list(range(8))
    return [HANDLED if right and whole else SILENT]


@case("optimizer rebuilt", "layer appended")
def _appended(tmp: Path) -> list[str]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gs.watch(model) as rec:
            for step in range(6):
                if step == 2:
                    model.append(nn.Linear(4, 2))
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                opt.zero_grad()
                model(torch.randn(5, 4)).sum().backward()
                opt.step()
    f = rec.to_frame()
    seen = set(f[f.step == 5]["layer"])
    return [HANDLED if {"2.weight", "2"} <= seen else SILENT]


for _every in (1.5, 0, -1, "2", True, 2.0):

    def _bad_every(tmp: Path, every: Any = _every) -> list[str]:
        try:
            gs.Recorder(every=every)
        except ValueError as e:
            return [CLEAR if "every" in str(e) else SILENT]
        return [SILENT]

    case("optimizer rebuilt", f"every={_every!r}")(_bad_every)


# -- CLI input and environment errors --------------------------------------------------------


def _cli_case(name: str, make: Callable[[Path], list[str]], ok: tuple[int, ...] = ()) -> None:
    case("CLI errors", name)(lambda tmp: [cli(make(tmp), ok=ok)])


_cli_case("diff of a missing folder", lambda t: ["diff", str(t / "a"), str(t / "b")])
_cli_case("report of a file", lambda t: ["report", str(REPO / "README.md")])
_cli_case("report of an empty folder", lambda t: ["report", str(t)])
_cli_case("diff of an empty folder", lambda t: ["diff", str(t), str(t)])
_cli_case(
    "--resume of a folder that is no sweep", lambda t: ["depth-sweep", *TINY, "--resume", str(t)]
)
_cli_case(
    "--out into a non-empty folder",
    lambda t: [(t / "x").write_text("x") and "depth-sweep", *TINY, "--out", str(t)],
)
_cli_case(
    "--out under a file", lambda t: ["depth-sweep", *TINY, "--out", str(REPO / "README.md" / "x")]
)
_cli_case("--workers 0", lambda t: ["depth-sweep", *TINY[:-1], "0", "--out", str(t / "s")])
_cli_case("unknown variant", lambda t: ["depth-sweep", "--variants", "nope", "--out", str(t / "s")])


@case("CLI errors", "a second --resume into a folder a sweep is writing")
def _locked(tmp: Path) -> list[str]:
    from gradscope.lab.sweep import sweep_lock

    folder = _sweep_folder(tmp)
    with sweep_lock(folder):
        return [cli(["depth-sweep", *TINY, "--resume", str(folder)])]


@case("CLI errors", "EACCES writing a sweep run")
def _eacces(tmp: Path) -> list[str]:
    def denied(*a: Any, **k: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp / "s" / "runs"))

    import gradscope.lab.sweep.store as sweep

    with patched(sweep, "atomic_write", denied):
        return [cli(["depth-sweep", *TINY, "--out", str(tmp / "s")])]


# -- a stopped sweep -------------------------------------------------------------------------

LONG = ["--depths", "2,6", "--variants", "plain,preln", "--steps", "600", "--every", "50"]
LONG += ["--dataset", "synthetic", "--workers", "2"]

for _how in ("SIGKILL", "SIGTERM", "SIGINT"):

    def _stopped(tmp: Path, how: str = _how) -> list[str]:
        import psutil

        out = tmp / "sweep"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradscope", "depth-sweep", *LONG, "--out", str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        kids: list[Any] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(kids) < 3:
            kids = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.1)
        if how == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=120)
        time.sleep(3)
        alive = [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        out_list = [SILENT if alive else HANDLED]
        if how != "SIGKILL":
            lines = [line for line in err.splitlines() if line.strip()]
            out_list.append(
                TRACEBACK if "Traceback" in err else HANDLED if len(lines) == 1 else SILENT
            )
        resume = [*LONG[:-1], "1", "--resume", str(out)]
        out_list.append(cli(["depth-sweep", *resume]))
        return out_list

    case("stopped sweep", _how)(_stopped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", help="only these groups")
    parser.add_argument("--quick", action="store_true", help="skip the stopped-sweep group")
    args = parser.parse_args()
    totals: Counter[str] = Counter()
    for group, cases in GROUPS.items():
        if args.group and group not in args.group:
            continue
        if args.quick and group == "stopped sweep":
            continue
        counts: Counter[str] = Counter()
        for name, fn in cases:
            tmp = Path(tempfile.mkdtemp(prefix="gradscope-faults-"))
            try:
                outcomes = fn(tmp)
            except Exception:
                outcomes = [TRACEBACK]
                traceback.print_exc()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            outcomes = outcomes if isinstance(outcomes, list) else [outcomes]
            counts.update(outcomes)
            bad = [o for o in outcomes if o in (TRACEBACK, SILENT)]
            flag = "  <-- " + ", ".join(bad) if bad else ""
            print(f"  {group}: {name}: {', '.join(outcomes)}{flag}", flush=True)
        totals.update(counts)
        print(f"{group}: {dict(counts)}", flush=True)
    n = sum(totals.values())
    print(
        f"\n{n} checks: {totals[CLEAR]} clear errors, {totals[HANDLED]} handled correctly, "
        f"{totals[TRACEBACK]} tracebacks, {totals[SILENT]} silent wrong or lost"
    )


if __name__ == "__main__":
    main()
