"""Frame digests (gradscope/digest.py): exact to the last bit, NaN-aware, logged per frame
when GRADSCOPE_FRAME_DIGEST is set, and compared test by test (tools/frames_compare.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gradscope as gs
from gradscope import digest
from tools import frames_compare


def _frame(values: list[float]) -> pd.DataFrame:
    n = len(values)
    return pd.DataFrame(
        {"step": np.arange(n), "layer": ["a"] * n, "kind": ["k"] * n, "stat": ["s"] * n}
        | {"value": np.array(values, dtype=np.float64)}
    )


def test_digest_sees_one_ulp_and_dtypes_but_not_nan_payloads() -> None:
    base = digest.frame_digest(_frame([1.0, np.nan, 0.0]))
    assert digest.frame_digest(_frame([1.0, np.nan, 0.0])) == base
    other_nan = np.array([1.0, 0.0, 0.0])
    other_nan.view(np.uint64)[1] = 0xFFF8_0000_0000_0001  # a negative NaN with a payload
    assert digest.frame_digest(_frame(list(other_nan))) == base
    assert digest.frame_digest(_frame([np.nextafter(1.0, 2.0), np.nan, 0.0])) != base
    assert digest.frame_digest(_frame([1.0, np.nan, -0.0])) != base
    as_float32 = _frame([1.0, np.nan, 0.0]).astype({"value": np.float32})
    assert digest.frame_digest(as_float32)["digest"] != base["digest"]
    renamed = _frame([1.0, np.nan, 0.0]).assign(layer=["a", "b", "a"])
    assert digest.frame_digest(renamed)["columns"][1] != base["columns"][1]


def _record() -> pd.DataFrame:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with gs.watch(model) as rec:
        model(torch.randn(8, 4)).sum().backward()
        rec.step()
    return rec.to_frame()


def test_every_frame_is_logged_with_its_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "frames.jsonl"
    monkeypatch.setenv(digest.ENV, str(log))
    monkeypatch.setenv(digest.OWNER_ENV, "tests/x.py::test_a")
    frame = _record()
    _record()
    monkeypatch.setenv(digest.OWNER_ENV, "tests/x.py::test_b")
    _record()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["owner"], e["seq"]) for e in lines] == [
        ("tests/x.py::test_a", 0),
        ("tests/x.py::test_a", 1),
        ("tests/x.py::test_b", 0),
    ]
    assert lines[0]["rows"] == len(frame) and lines[0]["digest"] == lines[2]["digest"]
    assert lines[0] | {"owner": "", "pid": 0, "seq": 0} == digest.frame_digest(frame) | {
        "owner": "",
        "pid": 0,
        "seq": 0,
    }


def test_compare_matches_frames_per_test_in_any_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two, three = (digest.frame_digest(_frame([v])) for v in (1.0, 2.0, 3.0))

    def write(path: Path, entries: list[tuple[str, dict]]) -> Path:
        path.write_text("".join(json.dumps({"owner": o, **d}) + "\n" for o, d in entries))
        return path

    before = write(tmp_path / "a", [("t::x (call)", one), ("t::x (call)", two), ("t::y", one)])
    after = write(tmp_path / "b", [("t::x (call)", two), ("t::x (setup)", one), ("t::y", one)])
    assert frames_compare.compare(before, after, None) == 0
    assert "2 tests identical, 0 differing" in capsys.readouterr().out
    after = write(tmp_path / "c", [("t::x", one), ("t::x", three), ("t::z", one)])
    assert frames_compare.compare(before, after, None) == 1
    out = capsys.readouterr().out
    assert "differing   t::x: 1 of 2 frames: columns value (float64)" in out
    assert "only-before t::y: 1 frames" in out and "only-after  t::z: 1 frames" in out
    twice = write(tmp_path / "d", [("t::w", one), ("t::w", one)])
    assert frames_compare.compare(twice, write(tmp_path / "e", [("t::w", one)]), None) == 1
    assert "differing   t::w: 1 of 2 frames (1 fewer after): \n" in capsys.readouterr().out
