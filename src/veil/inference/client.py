"""The device's HTTP client for the cloud service (httpx).

In the private-inference data flow this carries the perturbed representations that
:class:`~veil.inference.device.Device` produced to the cloud part
(:mod:`veil.inference.service`) and brings the predictions back. It sends only
safetensors bytes; a refusal by the service becomes a
:class:`~veil.errors.ServiceError` holding the service's message and status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import torch
from safetensors.torch import save

from veil.errors import ServiceError
from veil.inference.service import TENSOR_NAME

__all__ = ["CloudClient", "Prediction"]


@dataclass(frozen=True)
class Prediction:
    """The cloud's answer for ``N`` representations.

    Attributes:
        labels: predicted class of each, ``N`` ints.
        probabilities: softmax of the cloud part's output, ``N`` lists of floats.
    """

    labels: list[int]
    probabilities: list[list[float]]


class CloudClient:
    """Talks to one cloud service.

    Args:
        url: the service's base URL, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds to wait for an answer, > 0.
        client: an ``httpx.Client`` to send with (a FastAPI ``TestClient`` in tests);
            default a new one for ``url``.
    """

    def __init__(
        self, url: str, timeout: float = 30.0, client: httpx.Client | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self._client = client or httpx.Client(timeout=timeout)

    def info(self) -> dict[str, Any]:
        """What the service expects (``GET /info``)."""
        return self._answer(self._send("GET", "/info"))

    def predict(self, representation: torch.Tensor) -> Prediction:
        """Predictions for perturbed representations of shape ``(N, features)``."""
        body = save({TENSOR_NAME: representation.detach().float().contiguous()})
        headers = {"content-type": "application/octet-stream"}
        answer = self._answer(self._send("POST", "/predict", body, headers))
        return Prediction(answer["predictions"], answer["probabilities"])

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            return self._client.request(
                method, self.url + path, content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            raise ServiceError(
                f"cloud service at {self.url} could not be reached ({exc}); is "
                "`veil infer serve` running there?",
                0,
            ) from None

    @staticmethod
    def _answer(response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = {"error": response.text[:200]}
        if response.status_code >= 400:
            message = data.get("error") or data.get("detail") or response.text[:200]
            raise ServiceError(
                f"cloud service refused the request ({response.status_code}): "
                f"{message}",
                response.status_code,
            )
        return data
