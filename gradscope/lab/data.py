"""MNIST, Fashion-MNIST and a synthetic set as in-memory tensors, read from IDX files."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gradscope.lab import download
from gradscope.lab.choices import DatasetName

ENV_VAR = "GRADSCOPE_DATA"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_COUNTS = {"train": 60000, "test": 10000}
# Per-pixel mean and std of the training images, the usual normalization constants.
_NORMALIZE = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned bytes, 1 or 3 dimensions


class DataError(RuntimeError):
    """A dataset is missing, corrupt or cannot be read; the message says what to do."""


@dataclass(frozen=True)
class Dataset:
    """A classification dataset held as tensors: x is (N, 784) float32, y is (N,) int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return 10


def resolve_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: the argument, else $GRADSCOPE_DATA, else a per-user cache directory."""
    if data_root:
        return Path(data_root).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gradscope"


def read_idx(path: Path, ndim: int, count: int | None = None) -> torch.Tensor:
    """Reads one IDX file of unsigned bytes (gz or raw), checking magic number and sizes."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e} (the file is corrupt or truncated)") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is too short to be an IDX file ({len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(
            f"{path} has magic number {magic:#010x}, expected {_IDX_MAGIC[ndim]:#010x}: "
            "not an IDX file of this kind"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if count is not None and dims[0] != count:
        raise DataError(f"{path} holds {dims[0]} records, expected {count}")
    expected = header + int(torch.tensor(dims).prod().item())
    if len(raw) != expected:
        raise DataError(f"{path} is {len(raw)} bytes, expected {expected}: truncated or corrupt")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(dims)


def _candidate_dirs(name: DatasetName, root: Path) -> list[Path]:
    folder = "MNIST" if name == DatasetName.MNIST else "FashionMNIST"
    dirs = [root / folder / "raw"]
    if name == DatasetName.FASHION_MNIST:
        dirs.append(DEBIAN_FASHION)
    return dirs


def _find_file(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / f"{stem}.gz", d / stem):
            if candidate.is_file():
                return candidate
    return None


def ensure_files(
    name: str,
    data_root: str | os.PathLike[str] | None = None,
    progress: download.Progress | None = None,
) -> dict[str, Path]:
    """Finds the four IDX files of MNIST or Fashion-MNIST, each checked by MD5; downloads
    (see gradscope.lab.download) those that are missing or corrupt into ``<root>/MNIST/raw/``
    (``FashionMNIST/raw/``). Found files are never downloaded again.

    Raises:
        DataError: a file is missing or corrupt and no mirror gave a correct copy; the message
            names each file, where it belongs, and what the mirrors answered.
    """
    which = DatasetName(name)
    root = resolve_root(data_root)
    dirs = _candidate_dirs(which, root)
    resources = {r.stem: r for r in download.RESOURCES[which.value]}

    def scan() -> tuple[dict[str, Path], dict[str, tuple[Path | None, str]]]:
        found, bad = {}, {}
        for key, stem in _FILES.items():
            path = _find_file(stem, dirs)
            problem = "missing" if path is None else download.check(path, resources[stem])
            if problem is None and path is not None:
                found[key] = path
            else:
                bad[key] = (path, problem or "missing")
        return found, bad

    found, bad = scan()
    if not bad:
        return found
    failures: dict[str, str] = {}
    try:
        with download.folder_lock(dirs[0]):
            found, bad = scan()  # another process may have fetched them meanwhile
            for key in list(bad):
                try:
                    found[key] = download.fetch(
                        which.value, resources[_FILES[key]], dirs[0], progress
                    )
                    del bad[key]
                except download.DownloadError as e:
                    failures[key] = str(e)
    except OSError as e:  # the root cannot be written: nothing can be fetched into it
        failures = dict.fromkeys(bad, f"cannot write to {dirs[0]}: {e.strerror or e}")
    if not bad:
        return found
    missing = [_FILES[k] + ".gz" for k, (path, _) in bad.items() if path is None]
    corrupt = [f"{path} ({problem})" for path, problem in bad.values() if path is not None]
    why = next(iter(failures.values()), "")
    parts = []
    if missing:
        where = " or ".join(str(d) for d in dirs)
        parts.append(f"missing {', '.join(missing)} in {where}")
    if corrupt:
        parts.append(f"corrupt: {'; '.join(corrupt)}")
    raise DataError(
        f"{which.value}: {'; '.join(parts)}; it could not be downloaded ({why}). Place the "
        f"IDX files in {dirs[0]}, or point --data-root (or ${ENV_VAR}) at a folder holding "
        f"{dirs[0].relative_to(root)}/"
    )


def _load_idx_dataset(name: DatasetName, root: Path) -> Dataset:
    paths = ensure_files(name.value, root)
    tensors = {}
    for key, path in paths.items():
        split = key.split("_")[0]
        tensors[key] = read_idx(path, 3 if key.endswith("images") else 1, _COUNTS[split])
    for split in ("train", "test"):
        if tensors[f"{split}_images"].shape[1:] != (28, 28):
            raise DataError(f"{paths[f'{split}_images']}: images are not 28x28")
        if int(tensors[f"{split}_labels"].max()) > 9:
            raise DataError(f"{paths[f'{split}_labels']}: labels outside 0..9")
    mean, std = _NORMALIZE[name.value]

    def images(t: torch.Tensor) -> torch.Tensor:
        return ((t.reshape(t.shape[0], -1).float() / 255.0) - mean) / std

    return Dataset(
        name=name.value,
        x_train=images(tensors["train_images"]),
        y_train=tensors["train_labels"].long(),
        x_test=images(tensors["test_images"]),
        y_test=tensors["test_labels"].long(),
    )


def synthetic(n_train: int = 2048, n_test: int = 512, seed: int = 0) -> Dataset:
    """A small deterministic 10-class problem (noisy prototypes in 784 dimensions), no files.

    Example:
        >>> synthetic(n_train=100, n_test=20).x_train.shape
        torch.Size([100, 784])
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 784, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        x = prototypes[y] * 0.5 + torch.randn(n, 784, generator=g)
        return x, y

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test)


def load_dataset(name: str, data_root: str | os.PathLike[str] | None = None) -> Dataset:
    """Loads a dataset by name ("mnist", "fashion-mnist", "synthetic") into memory.

    Raises:
        DataError: the files are missing (and cannot be downloaded) or corrupt.
    """
    try:
        which = DatasetName(name)
    except ValueError:
        choices = ", ".join(d.value for d in DatasetName)
        raise DataError(f"unknown dataset {name!r}; choose one of {choices}") from None
    if which == DatasetName.SYNTHETIC:
        return synthetic()
    return _load_idx_dataset(which, resolve_root(data_root))


def subset(data: Dataset, size: int | None, seed: int = 0) -> Dataset:
    """The same dataset with `size` training examples drawn by a seeded permutation."""
    if size is None or size >= len(data.y_train):
        return data
    if size < 1:
        raise ValueError(f"train subset size must be >= 1, got {size}")
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(data.y_train), generator=g)[:size]
    return Dataset(data.name, data.x_train[keep], data.y_train[keep], data.x_test, data.y_test)


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches sliced from a seeded permutation."""
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
