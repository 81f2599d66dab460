"""Real data from phones: UCI HAPT sensor windows and TUANDROMD Android app features.

Both ship in ``data/`` (``uci-hapt/``, ``tuandromd/``) with their READMEs and
``SHA256SUMS``, checked before use, and load into the same :class:`Dataset` as
MNIST, so every partitioner and method works on them.

- ``hapt`` / ``hapt-12`` (Reyes-Ortiz et al. 2016): the raw 50 Hz accelerometer and
  gyroscope of 30 people's phones, cut into windows of 2.56 s (128 samples, 50%
  overlap) inside runs of one activity, so that a window never crosses a recording
  session nor an activity change. ``hapt`` keeps the 6 basic activities, ``hapt-12``
  all 12 (postural transitions too). Every window knows its user: the ``natural``
  partition gives one client per user. Each user's last session is held out as the
  test set, so no window, and no sample of an overlapping window, is in both splits.
- ``tuandromd`` (Borah et al. 2020): 4,464 apps, 241 binary static features
  (permissions, API calls), label malware (1) or goodware (0). No user ids: split it
  with ``iid`` or ``dirichlet``. A fixed 20% of the apps (seed 0) is the test set.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
import torch

from veil.data._datasets import (
    Dataset,
    FederatedDataset,
    resolve_data_dir,
    verify_checksums,
)
from veil.errors import DataError

__all__ = [
    "HAPT_ACTIVITIES",
    "WINDOW_SIZE",
    "WINDOW_STEP",
    "load_hapt",
    "load_hapt12",
    "load_tuandromd",
    "session_windows",
]

#: Samples per window (2.56 s at 50 Hz) and between window starts (50% overlap).
WINDOW_SIZE, WINDOW_STEP = 128, 64
HAPT_ACTIVITIES = (
    "WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING",
    "LAYING", "STAND_TO_SIT", "SIT_TO_STAND", "SIT_TO_LIE", "LIE_TO_SIT",
    "STAND_TO_LIE", "LIE_TO_STAND",
)  # fmt: skip
_HAPT_FILE = "hapt_raw_50hz.npz"
# Per-channel mean and std (acc x, y, z in g; gyro x, y, z in rad/s) over the
# training windows of the 6 basic activities, fixed here (like MNIST's 0.1307 and
# 0.3081) so that no statistic of the clients' data is computed at run time.
_HAPT_MEAN = (0.8098, 0.0212, 0.1019, 0.0052, -0.0022, -0.0072)
_HAPT_STD = (0.4096, 0.3929, 0.3458, 0.3977, 0.3680, 0.2502)
_TUANDROMD_FILE = "TUANDROMD.csv.gz"
_TUANDROMD_TEST_FRACTION = 0.2


def session_windows(
    labels: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    size: int = WINDOW_SIZE,
    step: int = WINDOW_STEP,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the windows are: inside one session and one run of a single label.

    Args:
        labels: shape ``(T,)``, the label of every sample (< 1: unlabelled).
        offsets: shape ``(S,)``, first sample of each session.
        lengths: shape ``(S,)``, samples of each session.
        size: samples per window, >= 1.
        step: samples between window starts, >= 1 (``size // 2``: 50% overlap).

    Returns:
        ``(starts, sessions, window_labels)``, each of shape ``(W,)``: the first
        sample of each window, its session and its label. Samples
        ``starts[i] .. starts[i] + size - 1`` all lie in session ``sessions[i]`` and
        all carry ``window_labels[i]``.
    """
    if size < 1 or step < 1:
        raise DataError(f"size and step must be >= 1, got {size} and {step}")
    starts, sessions, out_labels = [], [], []
    for s, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        session = labels[offset : offset + length]
        if len(session) == 0:
            continue
        # Boundaries of runs of equal labels, inside this session only.
        cuts = np.flatnonzero(np.diff(session)) + 1
        for begin, end in zip(np.r_[0, cuts], np.r_[cuts, len(session)], strict=True):
            if session[begin] < 1:
                continue
            for start in range(begin, end - size + 1, step):
                starts.append(offset + start)
                sessions.append(s)
                out_labels.append(session[begin])
    return (
        np.asarray(starts, dtype=np.int64),
        np.asarray(sessions, dtype=np.int64),
        np.asarray(out_labels, dtype=np.int64),
    )


def _load_hapt(data_dir: str | Path | None, num_classes: int) -> FederatedDataset:
    folder = resolve_data_dir("uci-hapt", data_dir)
    verify_checksums(folder, [_HAPT_FILE])
    with np.load(folder / _HAPT_FILE, allow_pickle=False) as archive:
        signals = np.concatenate([archive["acc"], archive["gyro"]], axis=1)
        labels = archive["label"].astype(np.int64)
        offsets, lengths = archive["run_offset"], archive["run_length"]
        session_user = archive["run_user"].astype(np.int64)
    starts, sessions, window_labels = session_windows(labels, offsets, lengths)
    keep = window_labels <= num_classes
    starts, sessions, window_labels = starts[keep], sessions[keep], window_labels[keep]

    signals = (signals - np.asarray(_HAPT_MEAN)) / np.asarray(_HAPT_STD)
    x = np.stack([signals[s : s + WINDOW_SIZE].T for s in starts]).astype(np.float32)
    users = session_user[sessions]
    # Each user's last session is the test set.
    last = {int(u): s for s, u in enumerate(session_user)}
    test = np.isin(sessions, list(last.values()))

    def split(mask: np.ndarray) -> Dataset:
        y = torch.from_numpy(window_labels[mask] - 1)
        return Dataset(torch.from_numpy(x[mask]), y, num_classes, users[mask])

    name = "hapt" if num_classes == 6 else "hapt-12"
    return FederatedDataset(name, split(~test), split(test))


def load_hapt(data_dir: str | Path | None = None) -> FederatedDataset:
    """UCI HAPT, 6 basic activities: windows ``(N, 6, 128)``, one user per window."""
    return _load_hapt(data_dir, 6)


def load_hapt12(data_dir: str | Path | None = None) -> FederatedDataset:
    """UCI HAPT, all 12 activities (the 6 basic ones and 6 postural transitions)."""
    return _load_hapt(data_dir, 12)


def load_tuandromd(data_dir: str | Path | None = None) -> FederatedDataset:
    """TUANDROMD: features ``(N, 241)`` in {0, 1}, label malware 1, goodware 0.

    The one row whose fields are all empty is dropped; any other empty or
    non-binary field is refused.
    """
    folder = resolve_data_dir("tuandromd", data_dir)
    verify_checksums(folder, [_TUANDROMD_FILE])
    path = folder / _TUANDROMD_FILE
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], [r for r in rows[1:] if any(f.strip() for f in r)]
    if header[-1] != "Label":
        raise DataError(f"{path}: the last column must be 'Label', got {header[-1]!r}")
    lookup = {"malware": 1, "goodware": 0}
    try:
        features = np.array([[int(v) for v in r[:-1]] for r in body], dtype=np.int64)
        y = np.array([lookup[r[-1].strip()] for r in body], dtype=np.int64)
    except (ValueError, KeyError) as exc:
        raise DataError(f"{path}: a field is empty or not 0/1 ({exc})") from None
    if features.shape[1] != len(header) - 1 or not np.isin(features, (0, 1)).all():
        raise DataError(f"{path}: features must be {len(header) - 1} columns of 0/1")
    order = np.random.default_rng(0).permutation(len(y))
    cut = round(len(y) * (1 - _TUANDROMD_TEST_FRACTION))

    def split(idx: np.ndarray) -> Dataset:
        x = torch.from_numpy(features[idx].astype(np.float32))
        return Dataset(x, torch.from_numpy(y[idx]), 2)

    return FederatedDataset("tuandromd", split(order[:cut]), split(order[cut:]))
