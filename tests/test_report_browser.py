"""The report opens in headless Chromium: no console errors, every image decodes."""

from conftest import rendered_page, screenshot
from typer.testing import CliRunner

from gradscope.cli import app


def test_report_renders_in_chromium(tmp_path, chromium):
    out = tmp_path / "sweep"
    args = [
        "depth-sweep",
        "--depths",
        "2,5",
        "--variants",
        "plain,residual,preln",
        "--steps",
        "8",
        "--every",
        "2",
        "--dataset",
        "synthetic",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    page = (out / "report.html").resolve()
    dom = rendered_page(chromium, page, tmp_path / "profile", min_images=5)
    # the first section is the answer: the trainability map and sentences, before any figure
    first, figures = dom.index("<h2>The answer</h2>"), dom.index("<h2>1. Gradient norm")
    assert first < figures and 'alt="trainability map' in dom
    assert dom.index("<li>", first) < figures
    screenshot(chromium, page, tmp_path / "report.png", "1280,800")  # the first screen


def test_the_sweep_report_opens_after_the_first_run_and_updates(tmp_path, chromium):
    """report.html exists from the first finished run, marked in progress and reloading
    itself, rewritten as runs finish; the last run leaves the whole report."""
    from functools import partial

    from gradscope.lab.sweep import SweepConfig, load_sweep, run_sweep
    from gradscope.report.sweep import render_progress

    out = tmp_path / "sweep"
    config = SweepConfig(
        variants=("plain", "preln"), depths=(2, 4), seeds=(0,), steps=6, every=2, width=32,
        dataset="synthetic",
    )  # fmt: skip
    pages: dict[int, str] = {}

    def seen(p):
        if p.done_runs not in pages and (out / "report.html").exists():
            pages[p.done_runs] = (out / "report.html").read_text()

    run_sweep(
        config, out, workers=1, on_progress=seen, on_run_finished=partial(render_progress, out)
    )
    assert sorted(pages) == [1, 2, 3, 4]
    for done in (1, 2, 3):
        page = pages[done]
        assert '<meta http-equiv="refresh"' in page and "(in progress)" in page
        assert f"{done} of 4 runs finished" in page
    assert pages[2] != pages[1]  # rewritten as runs finish
    # in Jupyter the sweep's results show the map of the runs so far
    summary = load_sweep(out)._repr_html_()
    assert "gradscope depth sweep: 4 runs" in summary and "data:image/png" in summary
    final = pages[4]
    assert "refresh" not in final and "In progress" not in final
    assert "<h2>1. Gradient norm against layer</h2>" in final
    # the first in-progress page renders: the map with its one finished cell
    first = tmp_path / "first.html"
    first.write_text(pages[1])
    dom = rendered_page(chromium, first, tmp_path / "profile", min_images=1)
    assert 'alt="trainability map' in dom
    # every planned cell is on the map from the start (preln has no finished run yet)
    import matplotlib.pyplot as plt

    import gradscope.plot as gp

    runs = load_sweep(out).runs.iloc[:1]
    ax = gp.trainability_map(runs, list(config.variants), list(config.depths))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["plain", "preln"]
    plt.close("all")
    screenshot(chromium, first, tmp_path / "in-progress.png", "1280,900")
