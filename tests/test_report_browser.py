"""The report opens in headless Chromium: no console errors, every image decodes."""

import re
import subprocess

from typer.testing import CliRunner

from gradscope.cli import app

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


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
    url = (out / "report.html").resolve().as_uri()
    dom = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = int(re.search(r'data-images="(\d+)"', dom.stdout).group(1))
    broken = int(re.search(r'data-broken-images="(\d+)"', dom.stdout).group(1))
    assert images >= 5 and broken == 0
    # the first section is the answer: the trainability map and sentences, before any figure
    first = dom.stdout.index("<h2>The answer</h2>")
    assert (
        first < dom.stdout.index("<h2>1. Gradient norm") and 'alt="trainability map' in dom.stdout
    )
    assert dom.stdout.index("<li>", first) < dom.stdout.index("<h2>1. Gradient norm")
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile2'}",
            f"--screenshot={shot}",
            "--window-size=1280,800",  # the first screen
            url,
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
