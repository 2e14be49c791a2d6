"""The command line against faults: every bad input or environment error exits 2 with one
line naming the file (no traceback), 1 stays "B is worse"; a sweep folder is locked while a
sweep writes it; workers end with their parent; Ctrl-C and SIGTERM leave one line and a
folder --resume goes on with."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from conftest import TINY_SWEEP as TINY
from torch import nn
from typer.testing import CliRunner

import gradscope as gs
from gradscope.cli import app
from gradscope.runs import save_run

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _one_line_error(result, *names: str, code: int = 2) -> str:
    """The error line of a failed command, checked: exit code, one line, no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def _run(folder: Path, steps: int = 3, every: int = 1) -> Path:
    """A small run's folder, data only (save_run): the commands under test read it, and
    rendering its report would add a second to every case."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gs.watch(model, optimizer=opt, every=every) as rec:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.step()
    return save_run(rec, folder)


def _enospc(path: str = ""):
    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or None)

    return fail


# -- damaged run folders: report and diff ----------------------------------------------------


def _truncate(run: Path) -> str:
    data = (run / "frame.parquet").read_bytes()
    (run / "frame.parquet").write_bytes(data[: len(data) // 3])
    return "frame.parquet"


def _edit(change):
    def damage(run: Path) -> str:
        info = json.loads((run / "run.json").read_text())
        change(info)
        (run / "run.json").write_text(json.dumps(info))
        return "run.json"

    return damage


def _mix(run: Path) -> str:
    other = _run(run.parent / "other", steps=5)
    (run / "frame.parquet").write_bytes((other / "frame.parquet").read_bytes())
    return "frame.parquet"


def _not_json(run: Path) -> str:
    (run / "run.json").write_text("")
    return "run.json"


DAMAGE = {
    "truncated frame": _truncate,
    "frame of another run": _mix,
    "empty run.json": _not_json,
    "missing field": _edit(lambda i: i["verdicts"][0].pop("message")),
    "mistyped field": _edit(lambda i: i["verdicts"][0].update(last_step=[1])),
    "unknown severity": _edit(lambda i: i["verdicts"][0].update(severity="bad")),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["report", "diff A B", "diff B A"])
def test_a_damaged_run_exits_2_with_one_line_naming_the_file(tmp_path, case, command):
    good, bad = _run(tmp_path / "good"), _run(tmp_path / "bad")
    name = DAMAGE[case](bad)
    args = {
        "report": ["report", str(bad)],
        "diff A B": ["diff", str(good), str(bad)],
        "diff B A": ["diff", str(bad), str(good)],
    }[command]
    _one_line_error(runner.invoke(app, args), str(bad / name))


def test_an_extra_field_is_a_one_line_warning_not_an_error(tmp_path):
    run = _run(tmp_path / "run")
    _edit(lambda i: i.update(written_by="gradscope 9"))(run)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "warning: " in result.stderr and "written_by" in result.stderr
    assert "Traceback" not in result.output


def test_a_spill_folder_reports(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gs.watch(model, optimizer=opt, spill_to=tmp_path / "spill", spill_steps=2):
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
    result = runner.invoke(app, ["report", str(tmp_path / "spill")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "spill" / "report.html").is_file()


def test_a_full_disk_writing_a_report_exits_2(tmp_path, monkeypatch):
    import gradscope.report.run as report

    run = _run(tmp_path / "run")
    monkeypatch.setattr(report, "render_run_report", _enospc(str(run / "report.html")))
    _one_line_error(
        runner.invoke(app, ["report", str(run)]), "report.html", "No space left on device"
    )


def test_diff_exits_1_only_when_b_is_worse(tmp_path):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert runner.invoke(app, ["diff", str(a), str(b)]).exit_code == 0
    info = json.loads((b / "run.json").read_text())
    info["verdicts"] = [{"id": "vanishing", "severity": "error", "message": "m", "suggestion": "s"}]
    (b / "run.json").write_text(json.dumps(info))
    assert runner.invoke(app, ["diff", str(a), str(b)]).exit_code == 1


def test_an_unexpected_error_is_one_line_too(tmp_path, monkeypatch):
    import gradscope.diff as diff

    run = _run(tmp_path / "run")

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(diff, "diff_runs", broken)
    line = _one_line_error(runner.invoke(app, ["diff", str(run), str(run)]))
    assert "unexpected KeyError" in line


# -- sweep folders ---------------------------------------------------------------------------


def _sweep(out: Path, *extra: str):
    return runner.invoke(app, ["depth-sweep", *TINY, "--out", str(out), *extra])


def _resume(out: Path):
    return runner.invoke(app, ["depth-sweep", *TINY, "--resume", str(out)])


def test_a_full_disk_writing_config_json_leaves_no_empty_file(tmp_path, monkeypatch):
    import gradscope.lab.sweep.store as sweep

    out = tmp_path / "sweep"
    with monkeypatch.context() as m:
        m.setattr(sweep.Path, "write_text", _enospc())
        _one_line_error(_sweep(out), str(out), "No space left on device")
    assert [p.name for p in out.iterdir()] == [".lock"] or not any(out.iterdir())
    assert _sweep(out).exit_code == 0  # the same --out works once there is room


def test_a_full_disk_saving_a_run_exits_2_and_the_folder_resumes(tmp_path, monkeypatch):
    import pandas as pd

    out = tmp_path / "sweep"
    real = pd.DataFrame.to_parquet
    calls = {"n": 0}

    def third_fails(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the second run's frame
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_parquet", third_fails)
        line = _one_line_error(_sweep(out), str(out / "runs"), "No space left on device")
    assert ".tmp" not in line
    assert not [p for p in (out / "runs").iterdir() if p.name.endswith(".tmp")]
    assert _resume(out).exit_code == 0
    assert len(pd.read_csv(out / "runs.csv")) == 4


def test_a_second_sweep_into_a_locked_folder_is_refused(tiny_sweep):
    from gradscope.lab.sweep import sweep_lock

    out = tiny_sweep
    with sweep_lock(out):  # a sweep writing there now
        line = _one_line_error(_resume(out), str(out), "another sweep")
    assert f"pid {os.getpid()}" in line
    assert _resume(out).exit_code == 0  # free again


def test_a_damaged_run_row_is_named_by_report_and_rerun_by_resume(tiny_sweep):
    out = tiny_sweep
    row = out / "runs" / "plain-d2-s0.json"
    data = json.loads(row.read_text())
    data["depth"] = "two"
    row.write_text(json.dumps(data))
    _one_line_error(runner.invoke(app, ["report", str(out)]), str(row), "'depth'")
    result = _resume(out)
    assert result.exit_code == 0, result.output
    assert "running it again" in result.stderr
    assert json.loads(row.read_text())["depth"] == 2


def test_a_run_outside_the_sweep_s_config_is_not_merged(tiny_sweep):
    out = tiny_sweep
    for suffix in (".json", ".parquet", ".loss.parquet"):
        src = out / "runs" / f"plain-d2-s0{suffix}"
        dst = out / "runs" / f"plain-d3-s0{suffix}"
        dst.write_bytes(src.read_bytes())
    row = out / "runs" / "plain-d3-s0.json"
    data = json.loads(row.read_text())
    data["depth"] = 3
    row.write_text(json.dumps(data))
    _one_line_error(runner.invoke(app, ["report", str(out)]), str(row), "not a run of this")


def test_an_empty_config_json_is_a_clear_error(tiny_sweep):
    out = tiny_sweep
    (out / "config.json").write_text("")
    _one_line_error(_resume(out), str(out / "config.json"))
    _one_line_error(runner.invoke(app, ["report", str(out)]), str(out / "config.json"))


# -- processes: kill, terminate, Ctrl-C ------------------------------------------------------

# long enough that the workers are still starting (importing torch) when it is stopped
LONG = ["--depths", "2,6", "--variants", "plain,preln", "--steps", "60", "--every", "20"]
LONG += ["--dataset", "synthetic", "--workers", "2"]


def _as_a_shell_starts_it() -> None:
    """Ctrl-C and SIGTERM at their defaults in the child, as an interactive shell starts a
    command. Ignored dispositions are inherited through exec, and a test run started as a
    background job (`make test &` from a script) ignores Ctrl-C: its sweep would then keep
    ignoring it, as a sweep started that way should (this test's old flake: exit 0)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _start_sweep(out: Path) -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    """A sweep in its own process group (as a shell runs it), once its workers run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradscope", "depth-sweep", *LONG, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_as_a_shell_starts_it,
    )
    deadline = time.monotonic() + 120
    kids: list[psutil.Process] = []
    while time.monotonic() < deadline:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if sum("spawn_main" in " ".join(k.cmdline()) for k in kids) >= 2:
            return proc, kids
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the sweep's workers never started")


def _gone(kids: list[psutil.Process], within: float = 15.0) -> list[int]:
    deadline = time.monotonic() + within
    alive = kids
    while alive and time.monotonic() < deadline:
        alive = [k for k in alive if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    return [k.pid for k in alive]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_stopped_sweep_leaves_no_process_and_a_folder_to_resume(tmp_path, how):
    out = tmp_path / "sweep"
    proc, kids = _start_sweep(out)  # stopped while its workers start (importing torch)
    if how == "SIGINT":  # Ctrl-C: the terminal signals the whole foreground group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    assert _gone(kids) == []  # workers, resource tracker: none left behind
    if how != "SIGKILL":
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if line.strip()] == [
            f"interrupted: finished runs and their report are in {out}; go on with --resume {out}"
        ]
    resume = [*LONG[:-1], "1", "--resume", str(out)]  # (one worker: not part of the config)
    result = runner.invoke(app, ["depth-sweep", *resume])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "runs.csv")) == 4
