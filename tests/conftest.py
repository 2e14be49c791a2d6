"""Shared fixtures: the MNIST data root, Chromium and the C kernels, all required in CI
(GRADSCOPE_REQUIRE_DATA=1), the two ways the recorder computes its statistics, and the
opt-in digest of every recorded frame (GRADSCOPE_FRAME_DIGEST, tools/frames_compare.py)."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gradscope import digest
from gradscope.lab import download
from gradscope.lab.data import load_dataset, resolve_root
from gradscope.recorder.stats import native

REPO = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("GRADSCOPE_REQUIRE_DATA") == "1"
# a depth sweep of four short synthetic runs, for the CLI's end-to-end tests
TINY_SWEEP = ["--depths", "2,6", "--variants", "plain,preln", "--steps", "12", "--every", "4"]
TINY_SWEEP += ["--dataset", "synthetic", "--workers", "1"]


DIGESTS = bool(os.environ.get(digest.ENV))


def pytest_configure(config: pytest.Config) -> None:
    """With GRADSCOPE_FRAME_DIGEST=<file>, every frame a recorder makes during the run is
    logged there (gradscope/digest.py): the file is emptied once, by the controlling
    process, and named absolutely for tests that change directory and for child processes."""
    if not DIGESTS:
        return
    path = os.path.abspath(os.environ[digest.ENV])
    os.environ[digest.ENV] = path
    if not hasattr(config, "workerinput"):  # not an xdist worker
        open(path, "w").close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """Frames made while a test sets up, runs and tears down are logged under its id."""
    if DIGESTS:
        os.environ[digest.OWNER_ENV] = item.nodeid
    yield
    os.environ.pop(digest.OWNER_ENV, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: pytest.FixtureRequest) -> Iterator[None]:
    """A shared fixture's frames are logged under the fixture, not the test that happens to
    set it up first (which differs between runs under xdist)."""
    if not DIGESTS or fixturedef.scope == "function":
        yield
        return
    before = os.environ.get(digest.OWNER_ENV)
    param = f"[{request.param}]" if hasattr(request, "param") else ""
    os.environ[digest.OWNER_ENV] = f"{fixturedef.baseid}::fixture {fixturedef.argname}{param}"
    yield
    if before is None:
        os.environ.pop(digest.OWNER_ENV, None)
    else:
        os.environ[digest.OWNER_ENV] = before


# torch threads per test worker: the cores shared out among pytest-xdist's workers (more
# would oversubscribe them: with 2 workers of 2 threads on 2 cores, training tests ran 3-10x
# slower, OpenMP threads waiting on each other)
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(autouse=True)
def torch_threads() -> None:
    """Every test starts with the same thread count: one that changes it must not change the
    rounding (and so the frames) of the tests a worker runs after it."""
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def digest_seeds() -> None:
    """Digest runs seed every test the same way, so a test that draws unseeded numbers
    records the same frame in both runs it compares."""
    if DIGESTS:
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)


def _need(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (GRADSCOPE_REQUIRE_DATA=1: CI must not skip this)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def no_download_mirrors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the public mirrors: downloads go to a closed loopback port (refused
    at once) unless a test serves the files itself."""
    for var in download.MIRRORS_ENV.values():
        monkeypatch.setenv(var, "http://127.0.0.1:9/")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    for root in (resolve_root(None), REPO.parent / "shared" / "data"):
        if (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
            return root
    _need("MNIST files not found: set GRADSCOPE_DATA")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def mnist(mnist_root: Path):  # type: ignore[no-untyped-def]
    return load_dataset("mnist", mnist_root)


@pytest.fixture(scope="session")
def finished_tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished TINY_SWEEP folder, made once per worker; tests take a copy (tiny_sweep)."""
    from typer.testing import CliRunner

    from gradscope.cli import app

    out = tmp_path_factory.mktemp("tiny-sweep") / "sweep"
    result = CliRunner().invoke(app, ["depth-sweep", *TINY_SWEEP, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def tiny_sweep(finished_tiny_sweep: Path, tmp_path: Path) -> Path:
    """A copy of a finished tiny sweep, the test's own to damage and resume (making the
    sweep itself is tested in test_cli.py's test_tiny_sweep_end_to_end)."""
    out = tmp_path / "sweep"
    shutil.copytree(finished_tiny_sweep, out)
    return out


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _need("chromium is not installed")
    assert path is not None
    return path


@pytest.fixture(params=["kernels", "torch ops"])
def stats_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the C kernels, then with the torch ops used where they are missing."""
    if request.param == "torch ops":
        monkeypatch.setattr(native, "takes", lambda t: False)
    elif native.library() is None:
        _need("no C compiler: the kernels cannot be built")
    return str(request.param)


@pytest.fixture
def kernels() -> None:
    """The C kernels, built (required in CI)."""
    if native.library() is None:
        _need("no C compiler: the kernels cannot be built")


@pytest.fixture
def inductor_cpu() -> None:
    """A C++ compiler, which torch.compile's CPU backend needs (the fused statistics checked
    on the CPU; required in CI)."""
    if not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        _need("no C++ compiler: torch.compile cannot build the fused statistics on the CPU")


CHROMIUM_FLAGS = [
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


def screenshot(
    chromium: str,
    page: Path,
    shot: Path,
    size: str,
    min_bytes: int = 10_000,
    keep_page: bool = False,
) -> Path:
    """A headless-Chromium PNG of `page` at `size` ("1280,800"), checked to be a PNG of at
    least `min_bytes`; with GRADSCOPE_KEEP_SCREENSHOTS=<dir> also kept there (and the page,
    with `keep_page`) for a person to look at."""
    profile = shot.with_name(shot.stem + "-profile")
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
         f"--window-size={size}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > min_bytes
    keep = os.environ.get("GRADSCOPE_KEEP_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(keep) / shot.name)
        if keep_page:
            shutil.copy2(page, Path(keep) / page.name)
    return shot


def rendered_page(chromium: str, page: Path, profile: Path, min_images: int) -> str:
    """The DOM of a report after Chromium loaded it, checked: it rendered, at least
    `min_images` figures, every one decoded, no console errors."""
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.search(r'data-images="(\d+)"', dom.stdout)
    broken = re.search(r'data-broken-images="(\d+)"', dom.stdout)
    assert images is not None and broken is not None, "the page's load script did not run"
    assert int(images.group(1)) >= min_images and int(broken.group(1)) == 0
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    return dom.stdout
