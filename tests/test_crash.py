"""Run folders and spills against the faults a long job meets: kill -9 during a save or a
spill (a child process kills itself at a chosen point: tests/faults.py), a full disk (an
injected ENOSPC), and hand-damaged files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import gradscope as gs
from gradscope.runs import RunError, save_run

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "faults.py"
OLD = REPO / "tests" / "data" / "run-format1"


def _child(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(FAULTS), *args], env=env, capture_output=True, text=True, timeout=240
    )


def _recorded(steps: int = 4, **kwargs) -> gs.Recorder:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gs.watch(model, optimizer=opt, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
    return rec


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- kill -9 during a save -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "steps"),
    [("frame", 5), ("report", 5), ("exchange", 5), ("swapped", 10)],
)
def test_a_save_killed_at_any_point_leaves_the_old_run_or_the_new_one(tmp_path, point, steps):
    out = tmp_path / "run"
    done = _child("save", str(out), point)
    assert done.returncode == -9, done.stderr  # it did die at that point
    run = gs.load_run(out)  # whole, and its run.json belongs to its frame
    assert sorted(run.frame["step"].unique()) == list(range(steps))
    assert run.info["steps"] == {"recorded": steps, "first": 0, "last": steps - 1}
    assert {p.name for p in out.iterdir()} == {"frame.parquet", "run.json", "report.html"}
    # the next save cleans what the killed one left beside the folder
    save_run(_recorded(), out)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_save_that_finishes_replaces_the_run(tmp_path):
    out = tmp_path / "run"
    done = _child("save", str(out), "none")
    assert done.returncode == 0, done.stderr
    assert sorted(gs.load_run(out).frame["step"].unique()) == list(range(10))


# -- kill -9 during a spill ------------------------------------------------------------------


def test_a_spilling_job_killed_loses_at_most_the_last_moments(tmp_path):
    folder = tmp_path / "spill"
    done = _child("spill", str(folder), "step")
    assert done.returncode == -9
    run = gs.load_run(folder)  # a spill folder reads back as a run
    steps = sorted(run.frame["step"].unique())
    # recorded every 10th step until the kill at step 300, parts every 0.3 s (~60 steps at
    # 5 ms a step): what is on disk reaches well past the 200,000-row threshold of old
    assert steps[0] == 0 and steps[-1] >= 200
    assert steps == list(range(0, steps[-1] + 1, 10))  # nothing missing in between
    assert run.verdicts  # diagnosed


def test_a_job_killed_inside_a_part_keeps_the_parts_before_it(tmp_path):
    folder = tmp_path / "spill"
    done = _child("spill", str(folder), "part")
    assert done.returncode == -9
    assert len(list(folder.glob(".part-*.tmp"))) == 1  # the half-written one, not a part
    run = gs.load_run(folder)
    assert sorted(run.frame["step"].unique()) == list(range(0, run.frame["step"].max() + 1, 10))
    assert pq.read_metadata(sorted(folder.glob("part-*.parquet"))[-1]).num_rows > 0


def test_spills_happen_by_steps_and_by_time(tmp_path):
    rec = _recorded(12, spill_to=tmp_path / "a", spill_steps=5, spill_seconds=3600)
    assert len(rec.spill_parts) == 2 and rec.rows_held > 0  # after steps 4 and 9
    rec.detach()
    assert len(gs.load_run(tmp_path / "a").frame) == len(rec.to_frame())
    rec = _recorded(3, spill_to=tmp_path / "b", spill_seconds=1e-9)
    assert len(rec.spill_parts) == 3  # every recorded step is past the time
    with pytest.raises(ValueError, match="spill_seconds"):
        gs.Recorder(spill_seconds=0)


# -- a full disk -----------------------------------------------------------------------------


def test_a_full_disk_while_spilling_warns_once_and_keeps_the_rows(tmp_path, monkeypatch):
    folder = tmp_path / "spill"
    with monkeypatch.context() as m:
        m.setattr(pd.DataFrame, "to_parquet", _enospc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = _recorded(6, spill_to=folder, spill_steps=1)  # opt.step() never raises
    full = [w for w in caught if "No space left on device" in str(w.message)]
    assert len(full) == 1 and str(folder) in str(full[0].message)
    assert rec.spill_parts == [] and [p.name for p in folder.iterdir()] == ["spill.json"]  # no .tmp
    assert sorted(rec.to_frame()["step"].unique()) == list(range(6))  # nothing lost
    rec.detach()  # the disk has room again: the rows held go out
    assert len(rec.spill_parts) == 1 and rec.rows_held == 0
    assert sorted(gs.load_run(folder).frame["step"].unique()) == list(range(6))


def test_a_full_disk_during_a_save_keeps_the_old_run_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _recorded(3).save(out)
    before = (out / "run.json").read_text()
    rec = _recorded(5)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", _enospc)
    with pytest.raises(OSError, match="No space left") as e:
        rec.save(out)
    assert e.value.filename is not None and str(out) in e.value.filename
    assert (out / "run.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_failed_atomic_write_removes_its_temporary_file(tmp_path):
    from gradscope.files import atomic_write

    def half(path: Path) -> None:
        path.write_bytes(b"x" * (2 << 20))
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "frame.parquet", half)
    assert e.value.filename == str(tmp_path / "frame.parquet")
    assert list(tmp_path.iterdir()) == []


# -- hand-damaged files ----------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_run(_recorded(4), tmp_path / "run")  # data only: the reader is under test


def _edit(run: Path, change) -> None:
    info = json.loads((run / "run.json").read_text())
    change(info)
    (run / "run.json").write_text(json.dumps(info))


def test_today_s_folders_still_load():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to note either
        run = gs.load_run(OLD)
    assert run.info["format"] == 1 and len(run.frame) == 134
    assert [v.id for v in run.verdicts] == ["healthy"]


def test_a_truncated_frame_is_a_clear_error(saved):
    data = (saved / "frame.parquet").read_bytes()
    (saved / "frame.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="frame.parquet"):
        gs.load_run(saved)


def test_a_frame_copied_in_from_another_run_is_refused(saved, tmp_path):
    other = save_run(_recorded(4, every=2), tmp_path / "other")
    shutil.copy(other / "frame.parquet", saved / "frame.parquet")
    with pytest.raises(RunError, match="not from one save"):
        gs.load_run(saved)


def test_a_frame_with_the_same_rows_but_other_values_is_refused(saved):
    frame = pd.read_parquet(saved / "frame.parquet")
    frame.loc[0, "value"] += 1.0
    frame.to_parquet(saved / "frame.parquet", index=False)
    with pytest.raises(RunError, match="digest differs"):
        gs.load_run(saved)


def test_unknown_fields_are_ignored_with_a_note(saved):
    def extra(info):
        info["added_later"] = 1
        info["verdicts"][0]["confidence"] = 0.9

    _edit(saved, extra)
    with pytest.warns(UserWarning, match=r"added_later, verdicts\[0\]\.confidence"):
        run = gs.load_run(saved)
    assert run.verdicts[0].id == run.info["verdicts"][0]["id"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda i: i["verdicts"][0].pop("severity"), "verdicts[0].severity"),
        (lambda i: i["verdicts"][0].update(first_step="3"), "verdicts[0].first_step"),
        (lambda i: i["verdicts"][0].update(severity="fatal"), "verdicts[0].severity"),
        (lambda i: i["verdicts"][0].update(layers="fc1"), "verdicts[0].layers"),
        (lambda i: i.update(verdicts={}), "verdicts"),
        (lambda i: i.pop("model"), "model"),
        (lambda i: i.update(format="2"), "format"),
        (lambda i: i["frame"].pop("sha256"), "frame.sha256"),
        (lambda i: i.pop("frame"), "frame"),
    ],
)
def test_missing_or_mistyped_fields_are_errors_naming_file_and_field(saved, change, field):
    _edit(saved, change)
    with pytest.raises(RunError) as e:
        gs.load_run(saved)
    assert str(saved / "run.json") in str(e.value) and f"'{field}'" in str(e.value)


def test_a_newer_format_is_read_with_a_note(saved):
    _edit(saved, lambda i: i.update(format=99))
    with pytest.warns(UserWarning, match="newer gradscope"):
        gs.load_run(saved)


def test_run_json_that_is_not_json_is_an_error(saved):
    (saved / "run.json").write_text("{ half")
    with pytest.raises(RunError, match="run.json is damaged"):
        gs.load_run(saved)


def test_saving_over_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="holds other files"):
        _recorded(2).save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_files_of_your_own_in_a_run_folder_survive_a_save(saved):
    (saved / "notes.txt").write_text("mine")
    _recorded(3).save(saved)
    assert (saved / "notes.txt").read_text() == "mine"
