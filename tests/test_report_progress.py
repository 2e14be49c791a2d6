"""How often a running sweep redraws its report (gradscope.report.sweep.ProgressReport)."""

from __future__ import annotations

from pathlib import Path

import gradscope.report.sweep as sweep_report
from gradscope.report.sweep import REDRAW_SECONDS, ProgressReport


def _drawn(monkeypatch, finishes: list[tuple[float, int]], cost: float, total: int) -> list[int]:
    """The runs after which the report is drawn, for runs finishing at the given times
    (seconds) on a clock that each drawing moves on by `cost` seconds."""
    clock = {"now": 0.0}
    drawn: list[int] = []

    def draw(out: Path, done: int, total: int) -> None:
        drawn.append(done)
        clock["now"] += cost

    monkeypatch.setattr(sweep_report, "render_progress", draw)
    progress = ProgressReport(Path("sweep"), clock=lambda: clock["now"])
    for at, done in finishes:
        clock["now"] = max(clock["now"], at)
        progress(done, total)
    return drawn


def test_the_first_run_draws_then_at_most_every_redraw_seconds(monkeypatch):
    gap = REDRAW_SECONDS / 4  # runs finishing four times per interval
    finishes = [(gap * k, k) for k in range(1, 13)]
    drawn = _drawn(monkeypatch, finishes, cost=0.1, total=13)
    assert drawn[0] == 1  # the report opens with the first finished run
    # then about one drawing per interval: runs 1, 6, 11 (0.1 s of drawing shifts each)
    assert drawn == [1, 6, 11]


def test_the_last_run_is_left_to_the_final_report(monkeypatch):
    drawn = _drawn(monkeypatch, [(0, 1), (100, 2), (200, 3)], cost=0.1, total=3)
    assert drawn == [1, 2]


def test_a_slow_drawing_is_spaced_to_a_quarter_of_the_time(monkeypatch):
    # drawing takes 20 s (a report of many runs): the next one waits 60 s after it ends
    finishes = [(10.0 * k, k) for k in range(1, 20)]
    drawn = _drawn(monkeypatch, finishes, cost=20.0, total=100)
    assert drawn == [1, 9, 17]  # drawn 10-30 s, then 90-110 s, then 170-190 s
