"""The device side of DSSGD over the network: ask for a turn, download, train, upload.

A device acts for one or more clients (:class:`~veil.network.device.Identity`),
each with its own :class:`~veil.learning.dssgd.DSSGDClient` (local parameters that
persist between turns, and under DP its privacy ledger). For a granted turn it
downloads the sparse parameters, rebuilds the turn's generator as the server's
download left it (:func:`~veil.network.dssgd.turn_generator`), runs
:func:`veil.experiment._dssgd.client_turn` (the function the simulation and Ray run)
and uploads the encoded change with ``X-Veil-Result``. With nothing to do it waits
at the server (one long-polling thread per client, turns taken one at a time); it
stops when the server answers 410 (run over) or every identity was revoked. An
upload the server refuses (a training that diverged to NaN, say) gives the turn back
(``POST .../abandon``) so that the run goes on; after :data:`MAX_REFUSED` refusals
in a row the device stops acting for that client.
Transport errors and 5xx are retried by :class:`~veil.network.device.DeviceClient`,
so a device rides out a server restart.

Under DP a device starting up reads back, from the server, the privacy events of
its clients' earlier uploads (``GET /v1/dssgd/ledger``), so a restarted device
keeps counting its budget from where it was.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from torch import nn

from veil.errors import ServiceError
from veil.learning import SGDTrainer
from veil.learning.dssgd import DSSGDClient, DSSGDSettings
from veil.network.device import Backoff, DeviceClient, Identity, _bearer, _raise_for
from veil.network.dssgd import MAX_WAIT, turn_generator
from veil.privacy import PrivacyEvent

__all__ = ["MAX_REFUSED", "DeviceTraffic", "restore_ledgers", "run_dssgd_device"]

logger = logging.getLogger(__name__)

ClientData = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
#: A device stops acting for a client after this many refused uploads in a row.
MAX_REFUSED = 3


@dataclass
class DeviceTraffic:
    """What a device sent and received: turns applied and HTTP body bytes.

    Attributes:
        turns: uploads the server applied.
        refused: uploads the server refused (an expired turn, say).
        bytes_up: body bytes of the applied uploads.
        bytes_down: body bytes of the downloads of those turns.
    """

    turns: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    per_client: dict[int, int] = field(default_factory=dict)


def restore_ledgers(
    client: DeviceClient, identities: list[Identity], states: dict[int, DSSGDClient]
) -> None:
    """Record into each client's ledger the events the server holds for it."""
    for ident in identities:
        ledger = states[ident.client_id].ledger
        if ledger is None:
            continue
        r = client.request("GET", "/v1/dssgd/ledger", headers=_bearer(ident.token))
        _raise_for(r)
        events = [PrivacyEvent.from_dict(e) for e in r.json()["events"]]
        for event in events:
            ledger.record(event)
        if events:
            logger.info(
                "client %d: %d privacy events restored", ident.client_id, len(events)
            )


class _Device:
    """The polling loop of :func:`run_dssgd_device`."""

    def __init__(
        self,
        client: DeviceClient,
        states: dict[int, DSSGDClient],
        model: nn.Module,
        data: ClientData,
        trainer: SGDTrainer,
        settings: DSSGDSettings,
        identities: list[Identity],
        asynchronous: bool = False,
    ) -> None:
        self.client = client
        self.asynchronous = asynchronous
        self.states = states
        self.model = model
        self.data = data
        self.trainer = trainer
        self.settings = settings
        self.identities = list(identities)
        self.traffic = DeviceTraffic()
        self.training = threading.Lock()  # one scratch model: one turn at a time
        self.over = threading.Event()

    def serve(self, ident: Identity, poll: Backoff) -> None:
        """Ask for ``ident``'s turns and take them, one client's training at a
        time, until the run is over or the identity is refused."""
        headers = _bearer(ident.token)
        failures = 0
        while not self.over.is_set():
            refused = None
            if self.asynchronous:
                # Ask only when this device can train at once: the async order
                # grants a turn at once, and a download left waiting while the
                # device's other clients train would only grow stale.
                with self.training:
                    r = self.ask(headers, 0.0)
                    if r.status_code == 200:
                        refused = self.take_turn(ident, r.json())
            else:
                r = self.ask(headers, MAX_WAIT)  # the server waits for the turn
                if r.status_code == 200:
                    with self.training:
                        refused = self.take_turn(ident, r.json())
            if r.status_code == 410:
                self.over.set()
                return
            if r.status_code in (401, 403):
                logger.warning("client %d dropped: %s", ident.client_id, r.text)
                return
            if r.status_code == 204:
                poll.wait()
                continue
            if r.status_code != 200:
                _raise_for(r)
            failures = failures + 1 if refused else 0
            if failures >= MAX_REFUSED:
                logger.error(
                    "client %d: %d uploads in a row refused; this device stops "
                    "acting for it",
                    ident.client_id,
                    failures,
                )
                return
            poll.reset()

    def ask(self, headers: dict[str, str], wait: float) -> httpx.Response:
        """``POST /v1/dssgd/turn``, waiting up to ``wait`` seconds at the server."""
        return self.client.request(
            "POST", "/v1/dssgd/turn", headers=headers, params={"wait": f"{wait:g}"}
        )

    def take_turn(self, ident: Identity, grant: dict[str, Any]) -> bool:
        """Download, train, upload; ``True`` if the server refused the upload (the
        turn is then given back, so that the run goes on without it)."""
        from veil.experiment._dssgd import client_turn

        k, turn = ident.client_id, int(grant["turn"])
        headers = _bearer(ident.token)
        r = self.client.request(
            "GET", f"/v1/dssgd/turns/{turn}/download", headers=headers
        )
        if r.status_code != 200:  # the turn expired meanwhile
            logger.info("client %d: no download for turn %d (%s)", k, turn, r.text)
            return False
        payload = r.content
        generator = turn_generator(
            int(grant["seed"]), self.settings.download_fraction, int(grant["size"])
        )
        x, y = self.data(k)
        self.states[k], reply = client_turn(
            self.states[k],
            self.model,
            x,
            y,
            payload,
            int(grant["version"]),
            generator.get_state(),
            self.trainer,
            self.settings,
        )
        result = {"loss": reply.loss, "over_budget": reply.over_budget, "metrics": {}}
        r = self.client.request(
            "POST",
            f"/v1/dssgd/turns/{turn}/upload",
            content=reply.payload,
            headers={**headers, "X-Veil-Result": json.dumps(result)},
        )
        if r.status_code == 201:
            t = self.traffic
            t.turns += 1
            t.bytes_up += len(reply.payload)
            t.bytes_down += len(payload)
            t.per_client[k] = t.per_client.get(k, 0) + 1
            logger.info("client %d: turn %d applied (%s)", k, turn, r.text)
            return False
        self.traffic.refused += 1
        logger.warning(
            "client %d: turn %d upload refused (%d %s)",
            k,
            turn,
            r.status_code,
            r.text[:300],
        )
        if r.status_code != 409:  # still this client's turn: give it back
            self.client.request(
                "POST", f"/v1/dssgd/turns/{turn}/abandon", headers=headers
            )
        return True


def run_dssgd_device(
    client: DeviceClient,
    states: dict[int, DSSGDClient],
    model: nn.Module,
    data: ClientData,
    trainer: SGDTrainer,
    settings: DSSGDSettings,
    identities: list[Identity],
    poll: Backoff | None = None,
    asynchronous: bool = False,
) -> DeviceTraffic:
    """Take turns for ``identities`` until the run is over; return the traffic.

    Args:
        client: the connection to the server.
        states: each identity's client state (local parameters, ledger), by id.
        model: a scratch model of the run's architecture (weights overwritten).
        data: a client's ``(features, labels)`` by client id.
        trainer: local training of a turn.
        settings: the run's turn settings (from the server's config).
        identities: the client ids this device acts for, with their tokens.
        poll: how long to wait between asking again after a 204 (the server
            already waited up to 10 s for a turn); default 0.01 to 0.2 s.
        asynchronous: the run's order is ``async``: ask for a turn only when this
            device is free to train (the server grants async turns at once, so a
            turn asked for while another client of this device trains would start
            from a staler download).
    """
    missing = [i.client_id for i in identities if i.client_id not in states]
    if missing:
        raise ServiceError(f"no client state for clients {missing}", 0)
    restore_ledgers(client, identities, states)
    device = _Device(
        client, states, model, data, trainer, settings, identities, asynchronous
    )
    errors: list[BaseException] = []

    def serve(ident: Identity) -> None:
        try:
            device.serve(ident, copy.copy(poll) if poll else Backoff(0.01, 0.2))
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)
            device.over.set()

    # One polling thread per identity, so that each waits at the server for its
    # own turn; the training lock keeps turns on this device one at a time.
    threads = [
        threading.Thread(target=serve, args=(i,), name=f"client-{i.client_id}")
        for i in identities
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    logger.info("device done: %d turns applied", device.traffic.turns)
    return device.traffic
