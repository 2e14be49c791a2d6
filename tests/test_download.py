"""MNIST fetched over loopback HTTP from local mirrors: MD5 checks, corrupt files replaced,
no mirror answering, two processes loading into one root at once."""

from __future__ import annotations

import functools
import gzip
import http.server
import multiprocessing
import os
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradscope.cli import app
from gradscope.lab import download
from gradscope.lab.data import DataError, ensure_files, load_dataset

NAMES = [r.name for r in download.RESOURCES["mnist"]]


class _Server:
    """Serves a folder on 127.0.0.1 in a thread; counts the files asked for."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path.rsplit("/", 1)[-1])
                super().do_GET()

        handler = functools.partial(Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(mnist_root, monkeypatch):
    """A mirror serving the four MNIST files, set as the only one."""
    server = _Server(mnist_root / "MNIST" / "raw")
    monkeypatch.setenv("GRADSCOPE_MNIST_MIRRORS", server.url)
    yield server
    server.close()


def _md5_ok(raw: Path) -> None:
    for resource in download.RESOURCES["mnist"]:
        assert download.check(raw / resource.name, resource) is None, resource.name


def test_a_fresh_root_gets_all_four_files_checked(mirror, tmp_path):
    seen = []
    data = load_dataset("mnist", tmp_path)  # the loader fetches what it needs
    assert len(data.y_train) == 60000 and len(data.y_test) == 10000
    raw = tmp_path / "MNIST" / "raw"
    assert sorted(mirror.requests) == sorted(NAMES)
    _md5_ok(raw)
    assert not list(raw.glob("*.part"))  # no temporary file left behind
    # found files are never downloaded again
    ensure_files("mnist", tmp_path, lambda name, done, total: seen.append(name))
    assert sorted(mirror.requests) == sorted(NAMES) and not seen


def test_progress_is_reported_with_the_total(mirror, tmp_path):
    seen: dict[str, tuple[int, int | None]] = {}
    ensure_files("mnist", tmp_path, lambda name, done, total: seen.__setitem__(name, (done, total)))
    assert set(seen) == set(NAMES)
    for name, (done, total) in seen.items():
        assert done == total == (tmp_path / "MNIST" / "raw" / name).stat().st_size


def test_a_corrupt_file_is_replaced(mirror, mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in NAMES:
        shutil.copy(mnist_root / "MNIST" / "raw" / name, raw / name)
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed: still a valid IDX file
    labels.write_bytes(gzip.compress(bytes(content)))
    ensure_files("mnist", tmp_path)
    assert mirror.requests == ["t10k-labels-idx1-ubyte.gz"]
    _md5_ok(raw)


def test_a_mirror_serving_a_bad_copy_is_skipped(mnist_root, tmp_path, monkeypatch):
    bad_folder = tmp_path / "bad"
    bad_folder.mkdir()
    (bad_folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the file")
    bad, good = _Server(bad_folder), _Server(mnist_root / "MNIST" / "raw")
    try:
        monkeypatch.setenv("GRADSCOPE_MNIST_MIRRORS", f"{bad.url},{good.url}")
        ensure_files("mnist", tmp_path / "root")
    finally:
        bad.close()
        good.close()
    assert "t10k-labels-idx1-ubyte.gz" in bad.requests and len(good.requests) == 4
    _md5_ok(tmp_path / "root" / "MNIST" / "raw")


def test_no_mirror_answering_names_what_to_place_where(tmp_path):
    with pytest.raises(DataError) as info:
        ensure_files("mnist", tmp_path)
    message = str(info.value)
    assert "\n" not in message and "127.0.0.1:9" in message
    assert str(tmp_path / "MNIST" / "raw") in message and "GRADSCOPE_DATA" in message
    assert "train-images-idx3-ubyte.gz" in message
    # a corrupt file that cannot be replaced is named, and kept for the user to look at
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match=r"corrupt: .*t10k-labels-idx1-ubyte.gz \(cannot be read"):
        ensure_files("mnist", tmp_path)
    assert (raw / "t10k-labels-idx1-ubyte.gz").exists()


def test_cli_without_data_or_mirror_exits_2_without_a_traceback(tmp_path):
    args = ["train", "--data-root", str(tmp_path), "--epochs", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "could not be downloaded" in result.output


def _load(root: str, url: str) -> str:
    os.environ["GRADSCOPE_MNIST_MIRRORS"] = url
    return str(ensure_files("mnist", root)["train_images"])


def test_two_processes_loading_into_one_root(mirror, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_load, [(str(tmp_path), mirror.url)] * 2)
    raw = tmp_path / "MNIST" / "raw"
    assert paths == [str(raw / "train-images-idx3-ubyte.gz")] * 2
    _md5_ok(raw)
    assert sorted(mirror.requests) == sorted(NAMES)  # the second found the first's files
    assert sorted(p.name for p in raw.iterdir()) == sorted([*NAMES, ".gradscope-download.lock"])
