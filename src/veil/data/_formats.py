"""Readers for the standard on-disk formats: MNIST IDX, CSV, NPZ and numeric ARFF.

Each reader returns NumPy arrays and raises :class:`~veil.errors.DataError` naming the
file and what was wrong with it. Nothing here touches the network, and nothing is
unpickled: NPZ files are opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np

from veil.errors import DataError

__all__ = ["read_arff", "read_csv", "read_idx", "read_npz"]

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is not a valid gzip file ({exc})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw.

    Args:
        path: the ``.idx*-ubyte`` file, optionally ending in ``.gz``; compression is
            detected from the content, not the name.

    Returns:
        An array with the file's dimensions and element type (``uint8`` for MNIST).

    Raises:
        DataError: the file is missing, truncated, or its header is not IDX.
    """
    path = Path(path)
    buf = _read_maybe_gzipped(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0:
        raise DataError(f"{path} is not an IDX file: its magic number must start 00 00")
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{path} is truncated: its header needs {header} bytes")
    dims = tuple(int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        raise DataError(
            f"{path} is corrupt: header says {dims} ({expected} bytes), "
            f"but the file holds {len(buf)} bytes"
        )
    data = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_csv(
    path: str | Path,
    label_column: str | int = -1,
    user_column: str | int | None = None,
    drop_columns: tuple[str, ...] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read a numeric CSV file (optionally gzipped) with a header row.

    Args:
        path: the file; ``.gz`` compression is detected from the content.
        label_column: name or index of the label column (default: the last one).
        user_column: name or index of a user-id column for the ``natural`` partition,
            or ``None``.
        drop_columns: names of further columns to leave out of the features.

    Returns:
        ``(features, labels, users)``: features as ``float32`` of shape ``(N, F)``,
        labels as ``int64`` of shape ``(N,)``, users as an array of shape ``(N,)``
        or ``None``. Rows with an empty field are refused, not silently dropped.
    """
    path = Path(path)
    text = _read_maybe_gzipped(path).decode("utf-8", errors="replace")
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 2:
        raise DataError(f"{path}: a CSV file needs a header row and at least one row")
    header = [h.strip() for h in rows[0]]

    def index_of(column: str | int, role: str) -> int:
        if isinstance(column, int):
            if not -len(header) <= column < len(header):
                raise DataError(
                    f"{path}: {role} column index must be in "
                    f"[{-len(header)}, {len(header)}), got {column}"
                )
            return column % len(header)
        if column not in header:
            raise DataError(
                f"{path}: no {role} column named {column!r}; columns are {header}"
            )
        return header.index(column)

    label_idx = index_of(label_column, "label")
    user_idx = None if user_column is None else index_of(user_column, "user")
    skip = {label_idx, *(index_of(c, "dropped") for c in drop_columns)}
    if user_idx is not None:
        skip.add(user_idx)
    feature_idx = [i for i in range(len(header)) if i not in skip]

    body = [r for r in rows[1:] if r]
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(
                f"{path}, line {line}: expected {len(header)} fields, got {len(row)}"
            )
    try:
        features = np.array(
            [[float(r[i]) for i in feature_idx] for r in body], dtype=np.float32
        )
    except ValueError as exc:
        raise DataError(f"{path}: a feature is not a number ({exc})") from None
    raw_labels = [r[label_idx].strip() for r in body]
    labels = _encode_labels(raw_labels)
    users = None if user_idx is None else np.array([r[user_idx] for r in body])
    return features, labels, users


def _encode_labels(raw: list[str]) -> np.ndarray:
    """Integer labels stay as they are; other labels map to 0..K-1, sorted."""
    try:
        return np.array([int(float(v)) for v in raw], dtype=np.int64)
    except ValueError:
        classes = sorted(set(raw))
        lookup = {c: i for i, c in enumerate(classes)}
        return np.array([lookup[v] for v in raw], dtype=np.int64)


def read_npz(
    path: str | Path,
    x_key: str = "x",
    y_key: str = "y",
    user_key: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read features, labels and optional user ids from an ``.npz`` archive.

    Object arrays are refused (``allow_pickle=False``): an archive that needs pickle
    to load is an error, never executed.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in (x_key, y_key, user_key) if k and k not in archive]
            if missing:
                held = sorted(archive.files)
                raise DataError(f"{path}: no array named {missing}; it holds {held}")
            x = np.asarray(archive[x_key])
            y = np.asarray(archive[y_key]).astype(np.int64)
            users = None if user_key is None else np.asarray(archive[user_key])
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except ValueError as exc:  # object arrays, bad zip members
        raise DataError(f"{path} cannot be read without pickle ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path} is not a valid npz archive ({exc})") from None
    if len(x) != len(y) or (users is not None and len(users) != len(y)):
        raise DataError(
            f"{path}: arrays must have the same length, got x={len(x)}, y={len(y)}"
            + ("" if users is None else f", users={len(users)}")
        )
    return x, y, users


def read_arff(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read a numeric ARFF file (Weka's format), optionally gzipped.

    Every attribute must be ``numeric``/``real``/``integer`` or nominal with numeric
    values (``{-1,0,1}``); the values are returned as numbers. Sparse rows, strings,
    dates and missing values (``?``) are refused. ``%`` starts a comment.

    Returns:
        ``(values, names)``: ``float32`` array of shape ``(N, A)`` for the ``A``
        attributes in file order, and their names.
    """
    path = Path(path)
    text = _read_maybe_gzipped(path).decode("utf-8", errors="replace")
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("%")]
    names: list[str] = []
    start = None
    for i, line in enumerate(lines):
        word = line.split(None, 1)[0].lower()
        if word == "@attribute":
            names.append(_arff_attribute(path, line))
        elif word == "@data":
            start = i + 1
            break
    if start is None or not names:
        raise DataError(f"{path} is not an ARFF file: @attribute or @data missing")
    rows = []
    for line_no, line in enumerate(lines[start:], start=1):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(names):
            raise DataError(
                f"{path}, data row {line_no}: expected {len(names)} values, "
                f"got {len(fields)}"
            )
        try:
            rows.append([float(f) for f in fields])
        except ValueError:
            raise DataError(
                f"{path}, data row {line_no}: values must be numbers, got {line!r}"
            ) from None
    return np.array(rows, dtype=np.float32).reshape(-1, len(names)), names


def _arff_attribute(path: Path, line: str) -> str:
    rest = line.split(None, 1)[1].strip() if len(line.split(None, 1)) == 2 else ""
    quote = rest[:1]
    if quote in ("'", '"') and quote in rest[1:]:
        end = rest.index(quote, 1)
        name, kind = rest[1:end], rest[end + 1 :].strip()
    else:
        name, _, kind = rest.replace("\t", " ").partition(" ")
        kind = kind.strip()
    if not name or not kind:
        raise DataError(f"{path}: bad attribute line {line!r}")
    if kind.lower() in ("numeric", "real", "integer"):
        return name
    if kind.startswith("{") and kind.endswith("}"):
        try:
            [float(v) for v in kind[1:-1].split(",")]
        except ValueError:
            pass
        else:
            return name
    raise DataError(
        f"{path}: attribute {name!r} must be numeric or nominal with numeric values, "
        f"got {kind!r}"
    )
