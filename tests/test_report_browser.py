"""The report opens in headless Chromium: no console errors, every image decodes."""

import subprocess

from conftest import CHROMIUM_FLAGS, rendered_page
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
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            f"--screenshot={shot}",
            "--window-size=1280,800",  # the first screen
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
