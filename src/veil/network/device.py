"""The device process: enrol, ask for work, train, upload, over and over.

A device holds one or more client identities (a phone holds one; a test or demo
process may stand in for several), each with its own token. It asks the server for
each identity's task, downloads the round's global model once, runs the algorithm's
``client_fit`` on that client's own data and uploads the update as safetensors with
its metadata as JSON. With nothing to do it long-polls: ``GET /v1/task?wait=S``
is held by the server until a round opens (or ``S`` seconds pass), so the device
learns of a round at once and sends one request per ``S`` seconds while idle.
Only when the server answers faster than that (a server without long polls, or
one stopping) does it wait between polls, doubling the wait up to a cap. When the
server cannot be reached or answers 5xx it retries with backoff, so it rides out a
server restart. It stops when the server says the run is over (410),
when every identity was revoked, or after ``max_unreachable`` seconds without
reaching the server.

TLS: ``ca_file`` is the certificate (or CA bundle) the device trusts; ``None`` uses
the system's trust store.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

from veil.errors import ServiceError
from veil.learning._types import ClientResult, ClientTask
from veil.learning.encoding import decode, encode
from veil.runtime import FederatedAlgorithm

__all__ = ["TASK_WAIT", "Backoff", "DeviceClient", "Identity", "pace", "run_device"]

logger = logging.getLogger(__name__)

#: Seconds a device asks the server to hold a task request (``?wait=``) when idle.
TASK_WAIT = 10.0


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``first``, doubling up to ``cap`` seconds."""

    first: float = 0.1
    cap: float = 2.0
    _next: float = field(default=0.0, repr=False)

    def reset(self) -> None:
        self._next = 0.0

    def wait(self) -> None:
        self._next = min(max(self._next * 2, self.first), self.cap)
        time.sleep(self._next * random.uniform(0.5, 1.0))


@dataclass
class Identity:
    """A client id this device acts for, and its token."""

    client_id: int
    token: str


class DeviceClient:
    """HTTP calls to one server, retried through transport errors and 5xx.

    Args:
        server: the server's base URL (``https://host:port``).
        ca_file: certificate file to trust for TLS; ``None`` for the system's.
        max_unreachable: give up after this many seconds without an answer.
        timeout: seconds per request.
    """

    def __init__(
        self,
        server: str,
        ca_file: str | Path | None = None,
        max_unreachable: float = 120.0,
        timeout: float = 60.0,
    ) -> None:
        verify: Any = True
        if ca_file is not None:
            verify = ssl.create_default_context(cafile=str(ca_file))
        self.http = httpx.Client(base_url=server, verify=verify, timeout=timeout)
        self.max_unreachable = max_unreachable
        self.timeout = timeout

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried with backoff while the server is unreachable or
        answers 5xx; a 4xx is returned to the caller."""
        backoff = Backoff(first=0.2, cap=5.0)
        since = time.monotonic()
        while True:
            try:
                r = self.http.request(method, path, **kwargs)
                if r.status_code < 500:
                    return r
                problem = f"{r.status_code} {r.text[:200]}"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - since > self.max_unreachable:
                raise ServiceError(
                    f"server unreachable for {self.max_unreachable:g} s ({problem})", 0
                )
            logger.info("%s %s failed (%s); retrying", method, path, problem)
            backoff.wait()

    def task(self, token: str, wait: float = 0.0) -> httpx.Response:
        """``GET /v1/task``, held by the server up to ``wait`` seconds while there
        is no task (the read timeout is set above ``wait``)."""
        kwargs: dict[str, Any] = {"headers": _bearer(token)}
        if wait > 0:
            kwargs["params"] = {"wait": f"{wait:g}"}
            kwargs["timeout"] = max(self.timeout, wait + 10.0)
        return self.request("GET", "/v1/task", **kwargs)

    def config(self) -> tuple[str, dict[str, Any]]:
        """The method and experiment config the server runs."""
        r = self.request("GET", "/v1/config")
        _raise_for(r)
        body = r.json()
        return str(body["method"]), dict(body["config"])

    def enrol(self, client_id: int, key: str | None = None) -> Identity:
        """Enrol as ``client_id``; the token is returned once."""
        headers = {} if key is None else _bearer(key)
        r = self.request(
            "POST", "/v1/enrol", json={"client_id": client_id}, headers=headers
        )
        _raise_for(r)
        return Identity(int(r.json()["client_id"]), str(r.json()["token"]))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _raise_for(r: httpx.Response) -> None:
    if r.status_code >= 400:
        try:
            message = r.json().get("error", r.text)
        except ValueError:
            message = r.text
        raise ServiceError(f"server refused: {message}", r.status_code)


ClientData = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class _Device:
    """The polling loop of :func:`run_device`."""

    def __init__(
        self,
        client: DeviceClient,
        algorithm: FederatedAlgorithm,
        model: nn.Module,
        data: ClientData,
        identities: list[Identity],
    ) -> None:
        self.client = client
        self.algorithm = algorithm
        self.model = model
        self.data = data
        self.identities = list(identities)
        self.models: dict[int, Any] = {}
        self.sent = 0

    def step(self, wait: float = 0.0) -> bool | None:
        """Ask for every identity's task and do those given; ``True`` if any work
        was done, ``None`` once the run is over or nobody is left. The last
        identity's request, when nothing was given before it, waits up to
        ``wait`` seconds for a round to open (a long poll)."""
        worked = False
        for i, ident in enumerate(list(self.identities)):
            last = i == len(self.identities) - 1
            r = self.client.task(ident.token, wait if last and not worked else 0.0)
            if r.status_code == 410:
                return None
            if r.status_code in (401, 403):
                logger.warning("client %d dropped: %s", ident.client_id, r.text)
                self.identities.remove(ident)
                continue
            if r.status_code == 200:
                self.work(ident, r.json())
                worked = True
        return worked if self.identities else None

    def global_model(self, rnd: int, token: str) -> Any:
        if rnd not in self.models:
            r = self.client.request(
                "GET", f"/v1/rounds/{rnd}/model", headers=_bearer(token)
            )
            _raise_for(r)
            self.models = {rnd: decode(r.content)}
        return self.models[rnd]

    def fit(
        self, ident: Identity, task: dict[str, Any]
    ) -> tuple[ClientTask, ClientResult] | None:
        """Download the task's round model and train on the client's data; ``None``
        when the round closed before the model could be downloaded."""
        rnd = int(task["round"])
        try:
            state = self.global_model(rnd, ident.token)
        except ServiceError as exc:  # the round closed meanwhile
            logger.info(
                "client %d: no model for round %d (%s)", ident.client_id, rnd, exc
            )
            return None
        t = ClientTask(ident.client_id, rnd, int(task["seed"]), state, task["settings"])
        x, y = self.data(ident.client_id)
        return t, self.algorithm.client_fit(t, self.model, x, y)

    def work(self, ident: Identity, task: dict[str, Any]) -> None:
        fitted = self.fit(ident, task)
        if fitted is None:
            return
        t, result = fitted
        rnd = t.round
        meta = {
            "num_examples": result.num_examples,
            "loss": result.loss,
            "metrics": result.metrics,
        }
        headers = {**_bearer(ident.token), "X-Veil-Result": json.dumps(meta)}
        r = self.client.request(
            "POST",
            f"/v1/rounds/{rnd}/update",
            content=encode(result.update),
            headers=headers,
        )
        if r.status_code == 201:
            self.sent += 1
            logger.info("client %d: round %d update accepted", ident.client_id, rnd)
        else:
            logger.warning(
                "client %d: round %d update refused (%d %s)",
                ident.client_id,
                rnd,
                r.status_code,
                r.text[:300],
            )


def run_device(
    client: DeviceClient,
    algorithm: FederatedAlgorithm,
    model: nn.Module,
    data: ClientData,
    identities: list[Identity],
    poll: Backoff | None = None,
    wait: float = TASK_WAIT,
) -> int:
    """Work for ``identities`` until the run is over; return the updates accepted.

    Args:
        client: the connection to the server.
        algorithm: the algorithm whose ``client_fit`` trains (built from the
            server's config, so it matches the server's).
        model: a scratch model of the run's architecture (weights are overwritten).
        data: a client's ``(features, labels)`` by client id.
        identities: the client ids this device acts for, with their tokens.
        poll: how long to wait between polls that came back empty at once.
        wait: seconds the server may hold an idle task request (0 to 10; 0 polls
            without long polls, waiting ``poll`` between polls).
    """
    device = _Device(client, algorithm, model, data, identities)
    poll = poll or Backoff(first=0.1, cap=2.0)
    while True:
        started = time.monotonic()
        worked = device.step(wait)
        if worked is None:
            logger.info("device done: %d updates accepted", device.sent)
            return device.sent
        pace(poll, worked, time.monotonic() - started, wait)


def pace(poll: Backoff, worked: bool, seconds: float, wait: float) -> None:
    """Between two steps of a device loop: go on at once after work or after a
    long poll that was held; back off after an empty answer that came at once
    (``seconds`` under half of ``min(wait, 1)``: no long polls, or a server
    stopping), so that a device never asks in a tight loop."""
    if worked or (wait > 0 and seconds >= min(wait, 1.0) / 2):
        poll.reset()
    else:
        poll.wait()
