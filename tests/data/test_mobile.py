"""Phone data: HAPT windows stay inside sessions and one activity, clients are
users, splits are disjoint; TUANDROMD loads with its published counts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.data import (
    load_dataset,
    load_hapt,
    load_hapt12,
    load_tuandromd,
    partition,
    session_windows,
)
from veil.errors import DataError


@pytest.fixture(scope="module")
def hapt_raw(repo_root: Path) -> dict[str, np.ndarray]:
    with np.load(repo_root / "data/uci-hapt/hapt_raw_50hz.npz") as archive:
        return {k: archive[k] for k in ("label", "run", "run_offset", "run_length")}


def test_hapt_windows_never_cross_a_session_or_an_activity(
    hapt_raw: dict[str, np.ndarray],
) -> None:
    labels = hapt_raw["label"].astype(np.int64)
    starts, sessions, window_labels = session_windows(
        labels, hapt_raw["run_offset"], hapt_raw["run_length"]
    )
    rows = starts[:, None] + np.arange(128)
    assert (hapt_raw["run"][rows] == sessions[:, None]).all()
    assert (labels[rows] == window_labels[:, None]).all()
    assert (window_labels >= 1).all()
    # 50% overlap inside a run: consecutive windows of a run start 64 samples apart.
    gaps = np.diff(starts)[(np.diff(sessions) == 0) & (np.diff(window_labels) == 0)]
    assert (gaps >= 64).all() and np.median(gaps) == 64


@settings(max_examples=40, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.integers(-1, 3), st.integers(1, 40)), min_size=1, max_size=12
    ),
    cut=st.integers(0, 12),
)
def test_session_windows_property(runs: list[tuple[int, int]], cut: int) -> None:
    labels = np.concatenate([np.full(n, lab) for lab, n in runs])
    cut = min(cut, len(labels))
    offsets, lengths = np.array([0, cut]), np.array([cut, len(labels) - cut])
    starts, sessions, window_labels = session_windows(labels, offsets, lengths, 8, 4)
    for s, session, lab in zip(starts, sessions, window_labels, strict=True):
        lo, hi = offsets[session], offsets[session] + lengths[session]
        assert lo <= s and s + 8 <= hi
        assert (labels[s : s + 8] == lab).all() and lab >= 1


def test_hapt_clients_are_users_and_splits_are_disjoint_sessions() -> None:
    hapt = load_hapt()
    assert hapt.train.x.shape[1:] == (6, 128) and hapt.train.num_classes == 6
    clients = partition(
        "natural", hapt.train.y.numpy(), 30, np.random.default_rng(0),
        users=hapt.train.users,
    )  # fmt: skip
    assert len(clients) == 30
    for k, idx in enumerate(clients):
        assert set(hapt.train.users[idx]) == {k + 1}
    # Every user is in both splits (its last session is the test set).
    assert set(hapt.test.users) == set(hapt.train.users) == set(range(1, 31))
    assert set(hapt.train.y.numpy()) == set(range(6))
    assert abs(float(hapt.train.x.mean())) < 0.05
    assert abs(float(hapt.train.x.std()) - 1) < 0.05


def test_hapt12_adds_the_postural_transitions() -> None:
    six, twelve = load_hapt(), load_hapt12()
    assert twelve.train.num_classes == 12
    assert set(twelve.train.y.numpy()) == set(range(12))
    assert len(twelve.train) > len(six.train)


def test_tuandromd_counts() -> None:
    data = load_dataset("tuandromd")
    # README: 4,464 usable rows, 3,565 malware and 899 goodware, 241 features.
    y = np.concatenate([data.train.y.numpy(), data.test.y.numpy()])
    assert np.bincount(y).tolist() == [899, 3565]
    assert data.train.x.shape == (3571, 241) and data.test.x.shape == (893, 241)
    assert set(np.unique(data.train.x.numpy())) == {0.0, 1.0}
    assert data.train.users is None


def test_mobile_datasets_are_checksummed(tmp_path: Path, repo_root: Path) -> None:
    shutil.copytree(repo_root / "data" / "tuandromd", tmp_path / "tuandromd")
    target = tmp_path / "tuandromd" / "TUANDROMD.csv.gz"
    raw = bytearray(target.read_bytes())
    raw[1000] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        load_tuandromd(tmp_path)
