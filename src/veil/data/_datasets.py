"""In-memory datasets and the bundled real data (MNIST) that ships in ``data/``.

A :class:`Dataset` is a pair of tensors (features, labels) plus, where the data knows
them, the user each example came from, which the ``natural`` partition uses. Bundled
datasets are found in this order: an explicit ``data_dir``, the ``VEIL_DATA``
environment variable, ``./data`` and the ``data/`` folder of the veil checkout. Every
file is checked against its ``SHA256SUMS`` before use.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from veil.data._formats import read_arff, read_idx
from veil.errors import DataError

__all__ = [
    "DATASETS",
    "Dataset",
    "FederatedDataset",
    "load_dataset",
    "load_mnist",
    "load_phishing",
    "resolve_data_dir",
]

_ENV = "VEIL_DATA"
# MNIST pixel statistics over the training set (after scaling to [0, 1]).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class Dataset:
    """Examples held in memory.

    Attributes:
        x: features, ``float32`` of shape ``(N, ...)`` (``(N, 1, 28, 28)`` for MNIST).
        y: labels, ``int64`` of shape ``(N,)``, in ``0..num_classes-1``.
        users: user id of each example, shape ``(N,)``, or ``None`` when unknown.
        num_classes: number of classes.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    users: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(
                f"features and labels must have the same length, "
                f"got {len(self.x)} and {len(self.y)}"
            )
        if self.users is not None and len(self.users) != len(self.y):
            raise DataError(
                f"users must have one entry per example, "
                f"got {len(self.users)} for {len(self.y)} examples"
            )

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> Dataset:
        """The examples at ``indices`` (a copy, in that order)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        users = None if self.users is None else self.users[np.asarray(indices)]
        return Dataset(self.x[idx], self.y[idx], self.num_classes, users)


@dataclass(frozen=True)
class FederatedDataset:
    """A named dataset with its training and test splits."""

    name: str
    train: Dataset
    test: Dataset


def _checkout_data_dir() -> Path:
    # src/veil/data/_datasets.py -> the repository root is four levels up.
    return Path(__file__).resolve().parents[3] / "data"


def resolve_data_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """Find the folder holding the bundled dataset ``name``.

    Raises:
        DataError: no candidate folder holds it; the message lists every place
            looked at and how to point veil elsewhere.
    """
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    elif os.environ.get(_ENV):
        candidates.append(Path(os.environ[_ENV]))
    else:
        candidates += [Path.cwd() / "data", _checkout_data_dir()]
    for root in candidates:
        if (root / name).is_dir():
            return root / name
    tried = ", ".join(str(c / name) for c in candidates)
    raise DataError(
        f"dataset {name!r} not found; looked in: {tried}. Point veil at the folder "
        f"that holds {name}/ with --data-dir DIR or the {_ENV} environment variable."
    )


def verify_checksums(folder: Path, files: list[str]) -> None:
    """Check ``files`` in ``folder`` against the folder's ``SHA256SUMS``."""
    sums_file = folder / "SHA256SUMS"
    if not sums_file.exists():
        raise DataError(f"{sums_file} is missing: cannot check the dataset's files")
    expected = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, fname = line.split()
            expected[fname.lstrip("*")] = digest
    for fname in files:
        path = folder / fname
        if not path.exists():
            raise DataError(
                f"{path} is missing. Restore it from the veil repository, or point "
                f"veil at another copy with --data-dir DIR or {_ENV}."
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if fname in expected and digest != expected[fname]:
            raise DataError(
                f"{path} is corrupt: sha256 {digest[:16]}... does not match "
                f"SHA256SUMS ({expected[fname][:16]}...). Restore the file."
            )


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def load_mnist(data_dir: str | Path | None = None) -> FederatedDataset:
    """Full MNIST (60,000 training and 10,000 test images), normalised.

    Images become ``float32`` tensors of shape ``(N, 1, 28, 28)``, scaled to [0, 1]
    and standardised with the training set's mean 0.1307 and std 0.3081.
    """
    folder = resolve_data_dir("mnist", data_dir)
    verify_checksums(folder, [f for pair in _MNIST_FILES.values() for f in pair])
    splits = {}
    for split, (images_file, labels_file) in _MNIST_FILES.items():
        images = read_idx(folder / images_file)
        labels = read_idx(folder / labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{folder}: {split} images must be (N, 28, 28) with N labels, "
                f"got {images.shape} and {labels.shape}"
            )
        x = torch.from_numpy(images).float().div_(255.0).sub_(MNIST_MEAN)
        x = x.div_(MNIST_STD).unsqueeze(1)
        splits[split] = Dataset(x, torch.from_numpy(labels.astype(np.int64)), 10)
    return FederatedDataset("mnist", splits["train"], splits["test"])


_PHISHING_FILE = "phishing_websites_training_dataset.arff.gz"
# Share of the phishing rows held out for testing, and the seed of that split.
_PHISHING_TEST_FRACTION, _PHISHING_SPLIT_SEED = 0.2, 0


def load_phishing(data_dir: str | Path | None = None) -> FederatedDataset:
    """UCI Phishing Websites (11,055 websites, 30 features coded -1/0/1).

    Features are ``float32`` of shape ``(N, 30)`` as coded in the file; the label
    ``Result`` becomes 0 for -1 (phishing) and 1 for 1 (legitimate). The file has no
    split: a fixed random 20% (seed 0, the same on every machine) is the test set,
    2,211 test and 8,844 training examples.
    """
    folder = resolve_data_dir("uci-phishing-websites", data_dir)
    verify_checksums(folder, [_PHISHING_FILE])
    values, names = read_arff(folder / _PHISHING_FILE)
    if names[-1] != "Result" or values.shape[1] != 31:
        raise DataError(
            f"{folder}: expected 30 features then 'Result', got {len(names)} "
            f"attributes ending in {names[-1]!r}"
        )
    x = torch.from_numpy(values[:, :-1].copy())
    y = torch.from_numpy((values[:, -1] > 0).astype(np.int64))
    order = np.random.default_rng(_PHISHING_SPLIT_SEED).permutation(len(y))
    n_test = round(_PHISHING_TEST_FRACTION * len(y))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    full = Dataset(x, y, 2)
    return FederatedDataset(
        "uci-phishing-websites", full.subset(train), full.subset(test)
    )


DATASETS: dict[str, Callable[[str | Path | None], FederatedDataset]] = {
    "mnist": load_mnist,
    "uci-phishing-websites": load_phishing,
}


def load_dataset(name: str, data_dir: str | Path | None = None) -> FederatedDataset:
    """Load a bundled dataset by name (see :data:`DATASETS`)."""
    if name not in DATASETS:
        raise DataError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](data_dir)
