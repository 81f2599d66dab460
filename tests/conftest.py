"""Shared fixtures: a tiny synthetic dataset registered as a bundled one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from veil.data import DATASETS, Dataset, FederatedDataset


def make_tiny(n_train: int = 600, n_test: int = 200, seed: int = 0) -> FederatedDataset:
    """MNIST-shaped data whose label is readable from the pixels, so models learn it."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Dataset:
        y = torch.randint(0, 10, (n,), generator=g)
        x = 0.3 * torch.randn(n, 1, 28, 28, generator=g)
        x[torch.arange(n), 0, 2 * y, :] += 1.0  # a bright row per label
        return Dataset(x, y, 10, users=np.arange(n) % 7)

    return FederatedDataset("tiny", split(n_train), split(n_test))


@pytest.fixture
def tiny_dataset(monkeypatch: pytest.MonkeyPatch) -> FederatedDataset:
    data = make_tiny()
    monkeypatch.setitem(DATASETS, "tiny", lambda _dir: data)
    return data


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
