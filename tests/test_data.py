import gzip
import shutil
from pathlib import Path

import pytest
import torch

from gradscope.lab.data import (
    DataError,
    iterate_batches,
    load_dataset,
    read_idx,
    resolve_root,
    subset,
    synthetic,
)

# The published class counts of MNIST (LeCun et al.), an independent reference.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_counts_and_label_histogram(mnist):
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    assert mnist.x_train.dtype == torch.float32
    assert torch.bincount(mnist.y_train).tolist() == TRAIN_COUNTS
    assert torch.bincount(mnist.y_test).tolist() == TEST_COUNTS
    # normalized with the training mean and std
    assert abs(float(mnist.x_train.mean())) < 1e-2
    assert abs(float(mnist.x_train.std()) - 1.0) < 1e-2


def test_fashion_mnist_from_debian_package():
    from gradscope.lab.data import DEBIAN_FASHION

    if not DEBIAN_FASHION.exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    data = load_dataset("fashion-mnist", "/nonexistent-root")
    assert torch.bincount(data.y_train).tolist() == [6000] * 10
    assert torch.bincount(data.y_test).tolist() == [1000] * 10


def test_root_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADSCOPE_DATA", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "opt") == tmp_path / "opt"
    assert resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("GRADSCOPE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_root(None) == tmp_path / "cache" / "gradscope"


def test_missing_files_name_the_setting(tmp_path):
    with pytest.raises(DataError, match="GRADSCOPE_DATA") as info:
        load_dataset("mnist", tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def _copy_mnist(src: Path, dst: Path) -> Path:
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (src / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(f, raw / f.name)
    return raw


def test_truncated_file_is_named(mnist_root, tmp_path):
    raw = _copy_mnist(mnist_root, tmp_path)
    path = raw / "t10k-labels-idx1-ubyte.gz"
    content = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(content[:-100]))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*truncated"):
        load_dataset("mnist", tmp_path)


def test_corrupt_gzip_and_bad_magic(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="x.gz"):
        read_idx(bad, 1)
    wrong = tmp_path / "labels"
    wrong.write_bytes(b"\x00\x00\x08\x03" + b"\x00\x00\x00\x01" + b"\x05")
    with pytest.raises(DataError, match="magic"):
        read_idx(wrong, 1)


def test_raw_idx_roundtrip(tmp_path):
    labels = bytes([3, 1, 4, 1, 5])
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x08\x01" + len(labels).to_bytes(4, "big") + labels)
    assert read_idx(path, 1, 5).tolist() == list(labels)
    with pytest.raises(DataError, match="holds 5 records, expected 6"):
        read_idx(path, 1, 6)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar")


def test_synthetic_is_deterministic_and_subset_fixed_by_seed():
    a, b = synthetic(), synthetic()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    s1, s2, s3 = subset(a, 100, seed=1), subset(a, 100, seed=1), subset(a, 100, seed=2)
    assert len(s1.y_train) == 100 and torch.equal(s1.x_train, s2.x_train)
    assert not torch.equal(s1.x_train, s3.x_train)
    assert torch.equal(s1.x_test, a.x_test)


def test_batches_cover_the_epoch_once():
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    seen = torch.cat([yb for _, yb in iterate_batches(x, y, 3, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
