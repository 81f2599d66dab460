"""The ARFF reader and the bundled UCI phishing websites dataset."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest

from veil.data import load_dataset, read_arff
from veil.errors import DataError

ARFF = """% a comment
@relation demo

@attribute a numeric
@attribute 'b c' {-1,0,1}
@attribute Result {-1,1}

@data
1.5,-1,1
0,0,-1
"""


def test_reads_numeric_and_numeric_nominal(tmp_path: Path) -> None:
    path = tmp_path / "demo.arff.gz"
    path.write_bytes(gzip.compress(ARFF.replace("\n", "\r\n").encode()))
    values, names = read_arff(path)
    assert names == ["a", "b c", "Result"]
    np.testing.assert_array_equal(values, [[1.5, -1, 1], [0, 0, -1]])


def test_agrees_with_scipy(tmp_path: Path) -> None:
    arff = pytest.importorskip("scipy.io.arff")
    path = tmp_path / "demo.arff"
    path.write_text(ARFF)
    values, names = read_arff(path)
    data, meta = arff.loadarff(io.StringIO(ARFF))
    assert names == meta.names()
    expected = [[float(row[k]) for k in meta.names()] for row in data]
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("@relation x\n@attribute a string\n@data\nfoo\n", "must be numeric"),
        ("@relation x\n@attribute a {x,y}\n@data\nx\n", "must be numeric"),
        ("@relation x\n@attribute a numeric\n@data\n?\n", "must be numbers"),
        ("@relation x\n@attribute a numeric\n@data\n1,2\n", "expected 1 values"),
        ("@relation x\n1,2\n", "not an ARFF file"),
    ],
)
def test_refuses_what_it_cannot_read(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.arff"
    path.write_text(text)
    with pytest.raises(DataError, match=words):
        read_arff(path)


def test_bundled_phishing_dataset(repo_root: Path) -> None:
    data = load_dataset("uci-phishing-websites", repo_root / "data")
    assert (len(data.train), len(data.test)) == (8844, 2211)
    assert data.train.x.shape == (8844, 30) and data.train.num_classes == 2
    y = np.concatenate([data.train.y.numpy(), data.test.y.numpy()])
    assert (int((y == 0).sum()), int((y == 1).sum())) == (4898, 6157)
    assert set(np.unique(data.train.x.numpy())) <= {-1.0, 0.0, 1.0}
    # the split is fixed: the same on every call
    again = load_dataset("uci-phishing-websites", repo_root / "data")
    assert np.array_equal(again.test.x.numpy(), data.test.x.numpy())
