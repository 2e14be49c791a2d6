"""Makes docs/first-screen.png, the README's picture: the first screen (1280 x 800) of a real
depth sweep's report in headless Chromium.

    .venv/bin/python tools/readme_picture.py reports/depth-sweep-<time>
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    folder = Path(sys.argv[1])
    subprocess.run([sys.executable, "-m", "gradscope", "report", str(folder)], check=True, cwd=REPO)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed")
    out = REPO / "docs" / "first-screen.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                f"--user-data-dir={profile}",
                f"--screenshot={out}",
                "--window-size=1280,800",
                (folder / "report.html").resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
        )
    print(out)


if __name__ == "__main__":
    main()
