"""The device side of secure aggregation rounds: train, encode, then answer the
protocol's steps over HTTP.

For each client id it acts for, the device asks for a task as usual; given one it
downloads the model, trains (``client_fit``) and keeps the result. From then on
that client has a :class:`SecureSession`: the device fetches the server's message
for the client's next step (``GET /v1/rounds/{r}/secagg``), lets the client's
:class:`~veil.secagg.SecAggClient` answer it, and posts the answer, until the
unmasking step is answered or the server says the client is out of the round. The
update never leaves the device: what travels is the masked vector
(:mod:`veil.network._secagg_wire`). Sessions of several clients interleave, so one
process can stand in for many clients of one round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from veil.errors import VeilError
from veil.learning._types import ClientResult, ClientTask
from veil.network._secagg_wire import (
    client_body,
    masked_input_body,
    server_message,
)
from veil.network.device import (
    TASK_WAIT,
    Backoff,
    DeviceClient,
    Identity,
    _bearer,
    _Device,
    pace,
)
from veil.network.secagg import STEP_NAMES
from veil.runtime import FederatedAlgorithm
from veil.secagg import SecAggClient, Step
from veil.secagg.messages import RoundConfig, decode

__all__ = ["SecureSession", "run_secure_device"]

logger = logging.getLogger(__name__)

_STEPS = {name: step for step, name in STEP_NAMES.items()}


class SecureSession:
    """One client's part in one secure round, after it trained.

    Args:
        algorithm: the secure algorithm (its ``secure_input`` encodes the update).
        ident: the client and its token.
        task: the round's task for it.
        result: what ``client_fit`` returned (stays on the device).
        stop_after: the step after whose answer the client stops answering (a
            simulated dropout, for tests and demos); ``None``: never.
    """

    def __init__(
        self,
        algorithm: FederatedAlgorithm,
        ident: Identity,
        task: ClientTask,
        result: ClientResult,
        stop_after: Step | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.ident = ident
        self.task = task
        self.result = result
        self.stop_after = stop_after
        self.client: SecAggClient | None = None
        self.done = False
        self.completed = False  # its unmasking answer was taken

    @property
    def round(self) -> int:
        return self.task.round

    def poll(self, http: DeviceClient) -> bool:
        """Fetch and answer the next step if it is open; ``True`` if a step was
        answered. Sets :attr:`done` once the client has no more to do."""
        rnd, k = self.round, self.ident.client_id
        r = http.request(
            "GET", f"/v1/rounds/{rnd}/secagg", headers=_bearer(self.ident.token)
        )
        if r.status_code == 204:
            return False
        if r.status_code != 200:
            logger.info("client %d: round %d over for it (%s)", k, rnd, r.text[:300])
            self.done = True
            return False
        body = r.json()
        step = _STEPS.get(body.get("step"))
        try:
            if step is None or not isinstance(body.get("message"), dict):
                raise VeilError(f"the server sent no step this device knows: {body}")
            answer = self._answer(step, server_message(body["message"]))
        except VeilError as exc:  # the client refuses: the server sees a dropout
            logger.warning("client %d: stops in round %d: %s", k, rnd, exc)
            self.done = True
            return False
        # a refused answer is not fatal here: the next poll says whether the
        # client is still in the round (an answer taken before a lost response
        # gets 409 when retried, and the client goes on)
        taken = self._send(http, step, answer)
        if step is Step.UNMASKING or step == self.stop_after:
            self.done = True
            self.completed = taken and step is Step.UNMASKING
        return True

    def _answer(self, step: Step, message: bytes) -> bytes:
        if step is Step.ADVERTISE_KEYS:
            config = decode(message)
            if not isinstance(config, RoundConfig):
                raise VeilError(f"expected a round config, got {type(config).__name__}")
            secure: Any = self.algorithm
            vector = secure.secure_input(self.task, self.result, len(config.clients))
            self.client = SecAggClient(self.ident.client_id, vector)
            return self.client.advertise_keys(message)
        if self.client is None:
            raise VeilError(f"{STEP_NAMES[step]} before the round config")
        if step is Step.SHARE_KEYS:
            return self.client.share_keys(message)
        if step is Step.MASKED_INPUT:
            return self.client.masked_input(message)
        return self.client.unmask(message)

    def _send(self, http: DeviceClient, step: Step, answer: bytes) -> bool:
        """Post the answer; whether the server took it."""
        path = f"/v1/rounds/{self.round}/secagg/{STEP_NAMES[step]}"
        headers = _bearer(self.ident.token)
        if step is Step.MASKED_INPUT:
            r = http.request(
                "POST", path, content=masked_input_body(answer), headers=headers
            )
        else:
            r = http.request("POST", path, json=client_body(answer), headers=headers)
        if r.status_code == 201:
            return True
        logger.warning(
            "client %d: round %d %s refused (%d %s)",
            self.ident.client_id,
            self.round,
            STEP_NAMES[step],
            r.status_code,
            r.text[:300],
        )
        return False


class _SecureDevice(_Device):
    """:class:`~veil.network.device._Device` with a session per trained client."""

    def __init__(self, *args: Any, stop_after: Mapping[int, Step], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sessions: dict[int, SecureSession] = {}
        self.stop_after = dict(stop_after)

    def step(self, wait: float = 0.0) -> bool | None:
        """Answer every session's open step and ask for the other clients'
        tasks; ``True`` if any work was done, ``None`` once the run is over. With
        no session open and nothing given before it, the last identity's task
        request waits up to ``wait`` seconds for a round (a long poll)."""
        worked = False
        for i, ident in enumerate(list(self.identities)):
            session = self.sessions.get(ident.client_id)
            if session is not None:
                worked |= session.poll(self.client)
                if session.done:
                    del self.sessions[ident.client_id]
                    self.sent += session.completed
                continue
            last = i == len(self.identities) - 1
            idle = last and not worked and not self.sessions
            r = self.client.task(ident.token, wait if idle else 0.0)
            if r.status_code == 410:
                return None
            if r.status_code in (401, 403):
                logger.warning("client %d dropped: %s", ident.client_id, r.text)
                self.identities.remove(ident)
            elif r.status_code == 200:
                self.work(ident, r.json())
                worked = True
        return worked if self.identities else None

    def work(self, ident: Identity, task: dict[str, Any]) -> None:
        fitted = self.fit(ident, task)
        if fitted is None:
            return
        t, result = fitted
        stop = self.stop_after.get(ident.client_id)
        session = SecureSession(self.algorithm, ident, t, result, stop)
        self.sessions[ident.client_id] = session
        session.poll(self.client)  # advertise keys at once


def run_secure_device(
    client: DeviceClient,
    algorithm: FederatedAlgorithm,
    model: Any,
    data: Any,
    identities: list[Identity],
    poll: Backoff | None = None,
    stop_after: Mapping[int, Step] | None = None,
    wait: float = TASK_WAIT,
) -> int:
    """:func:`~veil.network.device.run_device` for a server that aggregates
    securely; returns how many (client, round) pairs answered every step.

    Args:
        client, algorithm, model, data, identities: as for ``run_device``.
        poll: wait between polls with nothing to do (short by default: a step
            waits for the slowest client).
        stop_after: client id -> the step after which it stops answering, in every
            round (simulated dropouts for tests and demos).
        wait: seconds the server may hold an idle task request (a long poll,
            asked only while no secure session is open); 0 for none.
    """
    device = _SecureDevice(
        client, algorithm, model, data, identities, stop_after=stop_after or {}
    )
    poll = poll or Backoff(first=0.02, cap=0.5)
    while True:
        started = time.monotonic()
        worked = device.step(wait)
        if worked is None:
            logger.info("device done: %d secure rounds completed", device.sent)
            return device.sent
        pace(poll, worked, time.monotonic() - started, wait)
