"""The bundled MNIST: counts, checksums, and where veil looks for it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from veil.data import load_dataset, load_mnist, resolve_data_dir
from veil.errors import DataError


def test_full_mnist_loads_with_known_counts() -> None:
    mnist = load_mnist()
    assert mnist.train.x.shape == (60_000, 1, 28, 28)
    assert mnist.test.x.shape == (10_000, 1, 28, 28)
    train_counts = np.bincount(mnist.train.y.numpy(), minlength=10)
    test_counts = np.bincount(mnist.test.y.numpy(), minlength=10)
    # Label counts published in data/mnist/README.md.
    assert train_counts.tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert test_counts.tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert abs(float(mnist.train.x.mean())) < 1e-3  # standardised
    assert abs(float(mnist.train.x.std()) - 1.0) < 1e-3


def test_missing_data_dir_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "mnist") in message
    assert "--data-dir" in message and "VEIL_DATA" in message


def test_env_variable_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_root: Path
) -> None:
    shutil.copytree(repo_root / "data" / "mnist", tmp_path / "mnist")
    monkeypatch.setenv("VEIL_DATA", str(tmp_path))
    assert resolve_data_dir("mnist") == tmp_path / "mnist"


def test_corrupt_file_is_detected(tmp_path: Path, repo_root: Path) -> None:
    shutil.copytree(repo_root / "data" / "mnist", tmp_path / "mnist")
    target = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt"):
        load_mnist(tmp_path)
    target.unlink()
    with pytest.raises(DataError, match="missing"):
        load_mnist(tmp_path)


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="dataset must be one of"):
        load_dataset("cifar")
