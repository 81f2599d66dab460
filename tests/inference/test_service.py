"""The cloud service validates every request before the model runs."""

from __future__ import annotations

import io
import pickle
import struct

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save
from torch import nn

from veil.errors import ServiceError
from veil.inference import CloudClient, create_app, max_request_bytes

FEATURES, CLASSES, MAX_BATCH = 6, 3, 4


class _Cloud(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.layer = nn.Linear(FEATURES, CLASSES)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.layer(r)


@pytest.fixture
def cloud() -> _Cloud:
    torch.manual_seed(0)
    return _Cloud()


@pytest.fixture
def client(cloud: _Cloud) -> TestClient:
    return TestClient(create_app(cloud, FEATURES, CLASSES, MAX_BATCH))


def _post(client: TestClient, body: bytes, **headers: str):  # type: ignore[no-untyped-def]
    return client.post("/predict", content=body, headers=headers)


def test_valid_request_gets_predictions(client: TestClient, cloud: _Cloud) -> None:
    r = torch.randn(3, FEATURES)
    answer = _post(client, save({"representation": r}))
    assert answer.status_code == 200
    data = answer.json()
    expected = cloud.layer(r).argmax(1).tolist()
    assert data["predictions"] == expected
    assert len(data["probabilities"]) == 3
    assert sum(data["probabilities"][0]) == pytest.approx(1.0, abs=1e-5)
    info = client.get("/info").json()
    assert info["features"] == FEATURES and info["max_batch"] == MAX_BATCH


def _refused(answer, status: int, words: str) -> None:  # type: ignore[no-untyped-def]
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ({"representation": torch.randn(2, FEATURES + 1)}, "shape"),
        ({"representation": torch.randn(FEATURES)}, "shape"),
        ({"representation": torch.randn(MAX_BATCH + 1, FEATURES)}, "shape"),
        ({"representation": torch.randn(0, FEATURES)}, "shape"),
        ({"representation": torch.randn(2, FEATURES).double()}, "float32"),
        ({"representation": torch.ones(2, FEATURES, dtype=torch.int32)}, "float32"),
        ({"x": torch.randn(2, FEATURES)}, "exactly one tensor"),
        (
            {"representation": torch.randn(2, FEATURES), "y": torch.zeros(1)},
            "exactly one tensor",
        ),
    ],
)
def test_wrong_names_shapes_and_dtypes_are_422(
    client: TestClient, cloud: _Cloud, tensors: dict, words: str
) -> None:
    _refused(_post(client, save(tensors)), 422, words)
    assert cloud.calls == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_422(
    client: TestClient, cloud: _Cloud, bad: float
) -> None:
    r = torch.randn(2, FEATURES)
    r[1, 3] = bad
    _refused(_post(client, save({"representation": r})), 422, "finite")
    assert cloud.calls == 0


def test_oversized_body_is_413_before_reading(client: TestClient) -> None:
    limit = max_request_bytes(FEATURES, MAX_BATCH)
    big = b"\0" * (limit + 1)
    _refused(_post(client, big), 413, "at most")

    # a declared length over the limit is refused without reading the body
    def never_read():  # type: ignore[no-untyped-def]
        raise AssertionError("the body was read")
        yield b""

    _refused(
        client.post(
            "/predict", content=never_read(), headers={"content-length": str(limit + 1)}
        ),
        413,
        "at most",
    )


def test_oversized_chunked_body_is_413(client: TestClient) -> None:
    limit = max_request_bytes(FEATURES, MAX_BATCH)

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(limit // 1000 + 2):
            yield b"\0" * 1000

    _refused(client.post("/predict", content=chunks()), 413, "at most")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not safetensors at all",
        struct.pack("<Q", 10**9) + b"{}",
        struct.pack("<Q", 5) + b"{oops",
        struct.pack("<Q", 2) + b"[]",
    ],
)
def test_malformed_safetensors_is_400(
    client: TestClient, cloud: _Cloud, body: bytes
) -> None:
    _refused(_post(client, body), 400, "safetensors")
    assert cloud.calls == 0


def test_truncated_data_is_400(client: TestClient) -> None:
    body = save({"representation": torch.randn(2, FEATURES)})
    _refused(_post(client, body[:-8]), 400, "safetensors")


def test_pickle_and_torch_save_are_415_and_never_loaded(client: TestClient) -> None:
    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (pytest.fail, ("unpickled!",))

    _refused(_post(client, pickle.dumps(Boom())), 415, "pickle")
    _refused(_post(client, pickle.dumps({"representation": [1.0]})), 415, "pickle")
    buffer = io.BytesIO()
    torch.save({"representation": torch.randn(2, FEATURES)}, buffer)
    _refused(_post(client, buffer.getvalue()), 415, "pickle")


def test_cloud_client_round_trip_and_refusal(client: TestClient, cloud: _Cloud) -> None:
    remote = CloudClient("http://testserver", client=client)
    r = torch.randn(2, FEATURES)
    assert remote.predict(r).labels == cloud.layer(r).argmax(1).tolist()
    assert remote.info()["num_classes"] == CLASSES
    with pytest.raises(ServiceError) as info:
        remote.predict(torch.randn(2, FEATURES + 2))
    assert info.value.status_code == 422


def test_unreachable_service_is_a_service_error() -> None:
    remote = CloudClient("http://127.0.0.1:9", timeout=2.0)
    with pytest.raises(ServiceError, match="could not be reached"):
        remote.predict(torch.randn(1, FEATURES))
