"""Readers of IDX, CSV and NPZ files: round trips and clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from veil.data import read_csv, read_idx, read_npz
from veil.errors import DataError


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    array = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / "a.idx", array, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), array)


def test_idx_truncated_is_refused(tmp_path: Path) -> None:
    array = np.zeros((5, 4), dtype=np.uint8)
    write_idx(tmp_path / "a.idx", array, compress=False)
    data = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(data[:-3])
    with pytest.raises(DataError, match="corrupt"):
        read_idx(tmp_path / "a.idx")


def test_idx_bad_magic_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a.idx").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "a.idx")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing.idx")


def test_idx_broken_gzip(tmp_path: Path) -> None:
    (tmp_path / "a.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "a.gz")


def test_csv_with_label_and_user_columns(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text(
        "a,user,b,label\n1,u1,2,cat\n3,u2,4,dog\n5,u1,6,cat\n"
    )
    x, y, users = read_csv(tmp_path / "d.csv", label_column="label", user_column="user")
    np.testing.assert_array_equal(x, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(y, [0, 1, 0])
    assert list(users) == ["u1", "u2", "u1"]  # type: ignore[arg-type]


def test_csv_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,label\n1,0\nx,1\n")
    with pytest.raises(DataError, match="not a number"):
        read_csv(tmp_path / "d.csv")
    with pytest.raises(DataError, match="no label column named 'y'"):
        read_csv(tmp_path / "d.csv", label_column="y")
    (tmp_path / "e.csv").write_text("a,label\n1,0\n2\n")
    with pytest.raises(DataError, match="line 3"):
        read_csv(tmp_path / "e.csv")


def test_npz_round_trip_and_pickle_refused(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(
        tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1]), u=np.array([1, 1, 2, 2])
    )
    rx, ry, ru = read_npz(tmp_path / "d.npz", user_key="u")
    np.testing.assert_array_equal(rx, x)
    np.testing.assert_array_equal(ry, [0, 1, 0, 1])
    assert ru is not None and list(ru) == [1, 1, 2, 2]

    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}] * 2, dtype=object), y=[0, 1])
    with pytest.raises(DataError, match="pickle"):
        read_npz(tmp_path / "o.npz")
    with pytest.raises(DataError, match="no array named"):
        read_npz(tmp_path / "d.npz", x_key="features")
