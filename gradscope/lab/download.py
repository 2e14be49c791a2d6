"""Fetches the MNIST and Fashion-MNIST IDX files with the standard library, checked by MD5.

Files are tried from each mirror in order (torchvision's public mirrors, or the ones in
``$GRADSCOPE_MNIST_MIRRORS`` / ``$GRADSCOPE_FASHION_MNIST_MIRRORS``, comma-separated base
URLs), checked against their published MD5 while they stream in, and renamed into place only
when complete and correct, so a reader never sees half a file. Processes fetching into one
folder at once (sweep workers, torchrun ranks) take turns through a lock file there: the
second finds the files the first fetched.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on POSIX: no lock, each file still lands atomically
    fcntl = None  # type: ignore[assignment]

# (file name, bytes so far, total bytes or None where the server does not say)
Progress = Callable[[str, int, int | None], None]

TIMEOUT_S = 30.0  # per connection attempt and per read: a dead mirror fails, a slow one goes on
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Resource:
    """One IDX file: its name and the MD5 of the published .gz file and of its contents."""

    name: str
    md5: str
    # the uncompressed content: a file compressed again (other gzip settings) is the same data
    raw_md5: str

    @property
    def stem(self) -> str:
        return self.name.removesuffix(".gz")


RESOURCES = {
    # gz MD5s as torchvision publishes them; content MD5s of the original files
    "mnist": (
        Resource(
            "train-images-idx3-ubyte.gz",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "6bbc9ace898e44ae57da46a324031adb",
        ),
        Resource(
            "train-labels-idx1-ubyte.gz",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "a25bea736e30d166cdddb491f175f624",
        ),
        Resource(
            "t10k-images-idx3-ubyte.gz",
            "9fb629c4189551a2d022fa330f9573f3",
            "2646ac647ad5339dbf082846283269ea",
        ),
        Resource(
            "t10k-labels-idx1-ubyte.gz",
            "ec29112dd5afa0611ce80d1b7f02629c",
            "27ae3e4e09519cfbb04c329615203637",
        ),
    ),
    # content MD5s as in Debian's dataset-fashion-mnist, whose .gz files are recompressed
    "fashion-mnist": (
        Resource(
            "train-images-idx3-ubyte.gz",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        ),
        Resource(
            "train-labels-idx1-ubyte.gz",
            "25c81989df183df01b3e8a0aad5dffbe",
            "9018921c3c673c538a1fc5bad174d6f9",
        ),
        Resource(
            "t10k-images-idx3-ubyte.gz",
            "bef4ecab320f06d8554ea6380940ec79",
            "8181f5470baa50b63fa0f6fddb340f0a",
        ),
        Resource(
            "t10k-labels-idx1-ubyte.gz",
            "bb300cfdad3c16e7a12a480ee83cd310",
            "15d484375f8d13e6eb1aabb0c3f46965",
        ),
    ),
}
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
MIRRORS_ENV = {
    "mnist": "GRADSCOPE_MNIST_MIRRORS",
    "fashion-mnist": "GRADSCOPE_FASHION_MNIST_MIRRORS",
}


class DownloadError(RuntimeError):
    """No mirror gave a correct copy of a file; the message lists what each one answered."""


def mirrors(dataset: str) -> list[str]:
    """The base URLs tried for a dataset, in order (the environment variable replaces them)."""
    listed = os.environ.get(MIRRORS_ENV[dataset], "")
    bases = [m.strip() for m in listed.split(",") if m.strip()] or list(MIRRORS[dataset])
    return [b if b.endswith("/") else b + "/" for b in bases]


def check(path: Path, resource: Resource, compressed: bool | None = None) -> str | None:
    """Why the file at `path` is not a correct copy of `resource` (None when it is).

    Takes the .gz file (published MD5, or a recompressed copy of the same contents) or the
    uncompressed file; which one, `compressed` says (default: the name's suffix).
    """
    if compressed is None:
        compressed = path.suffix == ".gz"
    try:
        if not compressed:
            return _mismatch(_md5_of_file(path), resource.raw_md5, "its contents")
        if _md5_of_file(path) == resource.md5:
            return None
        with gzip.open(path, "rb") as f:
            digest = hashlib.md5(usedforsecurity=False)
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        return f"cannot be read as gzip ({e}): truncated or corrupt"
    return _mismatch(digest.hexdigest(), resource.raw_md5, "its uncompressed contents")


def _mismatch(got: str, expected: str, what: str) -> str | None:
    return None if got == expected else f"MD5 of {what} is {got}, expected {expected}"


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def folder_lock(directory: Path) -> Iterator[None]:
    """Holds an exclusive lock on `directory` while other processes may write there."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(directory / ".gradscope-download.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch(
    dataset: str, resource: Resource, directory: Path, progress: Progress | None = None
) -> Path:
    """Downloads one file into `directory` from the first mirror that gives a correct copy.

    Raises:
        DownloadError: every mirror failed; the message says how each one did.
    """
    failures = []
    for base in mirrors(dataset):
        url = base + resource.name
        try:
            return _fetch_from(url, resource, directory, progress)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            failures.append(f"{url}: {reason}")
    raise DownloadError("; ".join(failures) or "no mirror configured")


def _fetch_from(url: str, resource: Resource, directory: Path, progress: Progress | None) -> Path:
    target = directory / resource.name
    digest = hashlib.md5(usedforsecurity=False)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{resource.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            while chunk := r.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(resource.name, done, total)
        if total is not None and done != total:
            raise ValueError(f"got {done} of {total} bytes")
        if digest.hexdigest() != resource.md5:
            problem = check(
                tmp, resource, compressed=True
            )  # a recompressed copy of the same data is fine
            if problem is not None:
                raise ValueError(problem)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
