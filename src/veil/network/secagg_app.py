"""The HTTP endpoints of secure aggregation rounds (added to the app of a
:class:`~veil.network.secagg.SecureFederatedServer`).

All take the device token (``Authorization: Bearer TOKEN``):

- ``GET /v1/rounds/{round}/secagg``: 200 ``{"round", "step", "seconds_left",
  "message"}``, the server's message opening the client's next step (the round
  config, its neighbours' keys, the shares sealed for it, or the unmask request);
  204 while it must wait (``Retry-After``); 409 when it is out of the round (with
  the reason) or the round is not open; 410 once the run is over.
- ``POST /v1/rounds/{round}/secagg/advertise-keys``: JSON ``{"encryption_key",
  "mask_key", "seed_commitment"}`` (base64, 32 bytes each);
- ``POST /v1/rounds/{round}/secagg/share-keys``: JSON ``{"ciphertexts":
  [{"client", "ciphertext"}]}``, one sealed share pair per neighbour;
- ``POST /v1/rounds/{round}/secagg/masked-input``: safetensors, one tensor
  ``masked_input`` (1-D, the round's unsigned type and length) and metadata
  ``complaints`` (JSON list);
- ``POST /v1/rounds/{round}/secagg/unmasking``: JSON ``{"shares": [{"client",
  "kind", "share"}]}``.

Each answer is 201 ``{"round", "client_id", "step"}`` once the state machine took
it. Refusals, sent before the round changes: 401/403 token, 403 a client the round
did not invite, 409 wrong round, another step open, a second answer, or a client
already out of the round, 413 body too large, 415 pickle bytes, 400 malformed body,
422 a message the protocol refuses (shares not addressed to every neighbour once,
values beyond ``2**bits``, shares that were not asked for, ...).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from veil._wire import read_body, refuse_pickle
from veil.network.app import RETRY_AFTER, Bearer, ErrorBody, _token
from veil.network.secagg import STEP_NAMES, SecureFederatedServer
from veil.secagg import Step

__all__ = [
    "AdvertiseKeysBody",
    "Ciphertext",
    "SecAggAccepted",
    "SecAggStep",
    "Share",
    "ShareKeysBody",
    "UnmaskingBody",
    "add_secagg_routes",
]

_KEY = Annotated[str, Field(max_length=64)]
_ID = Annotated[int, Field(ge=0, lt=2**32)]
_MAX_ITEMS = 1 << 16


class SecAggStep(BaseModel):
    """The server's message opening a client's next step."""

    round: int
    step: str
    seconds_left: float
    message: dict[str, Any]


class AdvertiseKeysBody(BaseModel):
    """Advertise keys: two X25519 public keys and a commitment (base64)."""

    encryption_key: _KEY
    mask_key: _KEY
    seed_commitment: _KEY


class Ciphertext(BaseModel):
    """One sealed share pair and the client it is addressed to (or came from)."""

    client: _ID
    ciphertext: Annotated[str, Field(max_length=1 << 17)]


class ShareKeysBody(BaseModel):
    """Share keys: one sealed share pair per neighbour, by recipient."""

    ciphertexts: Annotated[list[Ciphertext], Field(max_length=_MAX_ITEMS)]


class Share(BaseModel):
    """One revealed share of a neighbour's secret."""

    client: _ID
    kind: Literal["self_mask_seed", "mask_key"]
    share: _KEY


class UnmaskingBody(BaseModel):
    """Unmasking: one share per neighbour the unmask request named."""

    shares: Annotated[list[Share], Field(max_length=_MAX_ITEMS)]


class SecAggAccepted(BaseModel):
    """An answer the round's state machine took."""

    round: int
    client_id: int
    step: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 409, 410, 413, 415, 422)
}
_SAFETENSORS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    }
}


def _size(request: Request) -> int:
    """The body's declared length in bytes (0 when absent or not a number)."""
    declared = request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else 0


def add_secagg_routes(app: FastAPI, server: SecureFederatedServer) -> None:
    """Add the secure aggregation endpoints of ``server`` to ``app``."""

    def answer(client_id: int, rnd: int, step: Step) -> SecAggAccepted:
        return SecAggAccepted(round=rnd, client_id=client_id, step=STEP_NAMES[step])

    @app.get(
        "/v1/rounds/{rnd}/secagg",
        response_model=SecAggStep,
        responses={**_ERRORS, 204: {"description": "Wait, then ask again"}},
    )
    def secagg_step(rnd: int, credentials: Bearer) -> Any:
        """The server's message for this client's next secure aggregation step."""
        client_id = server.authenticate(_token(credentials))
        found = server.secure_step(client_id, rnd)
        if found is None:
            return Response(status_code=204, headers={"Retry-After": str(RETRY_AFTER)})
        return SecAggStep(**found)

    @app.post(
        "/v1/rounds/{rnd}/secagg/advertise-keys", status_code=201, responses=_ERRORS
    )
    def advertise_keys(
        rnd: int, body: AdvertiseKeysBody, request: Request, credentials: Bearer
    ) -> SecAggAccepted:
        """Step 1: this client's public keys and seed commitment."""
        client_id = server.authenticate(_token(credentials))
        size = _size(request)
        step = Step.ADVERTISE_KEYS
        server.secure_receive(client_id, rnd, step, body.model_dump(), size)
        return answer(client_id, rnd, step)

    @app.post("/v1/rounds/{rnd}/secagg/share-keys", status_code=201, responses=_ERRORS)
    def share_keys(
        rnd: int, body: ShareKeysBody, request: Request, credentials: Bearer
    ) -> SecAggAccepted:
        """Step 2: the sealed shares of this client's secrets, one per neighbour."""
        client_id = server.authenticate(_token(credentials))
        size = _size(request)
        step = Step.SHARE_KEYS
        server.secure_receive(client_id, rnd, step, body.model_dump(), size)
        return answer(client_id, rnd, step)

    @app.post(
        "/v1/rounds/{rnd}/secagg/masked-input",
        status_code=201,
        responses=_ERRORS,
        openapi_extra=_SAFETENSORS_BODY,
    )
    async def masked_input(
        rnd: int, request: Request, credentials: Bearer
    ) -> SecAggAccepted:
        """Step 3: this client's masked input, as safetensors."""
        client_id = server.authenticate(_token(credentials))
        payload = await read_body(request, server.max_masked_bytes(rnd))
        refuse_pickle(payload)
        step = Step.MASKED_INPUT
        await run_in_threadpool(
            server.secure_receive, client_id, rnd, step, payload, len(payload)
        )
        return answer(client_id, rnd, step)

    @app.post("/v1/rounds/{rnd}/secagg/unmasking", status_code=201, responses=_ERRORS)
    def unmasking(
        rnd: int, body: UnmaskingBody, request: Request, credentials: Bearer
    ) -> SecAggAccepted:
        """Step 4: the shares the unmask request asked this client for."""
        client_id = server.authenticate(_token(credentials))
        size = _size(request)
        step = Step.UNMASKING
        server.secure_receive(client_id, rnd, step, body.model_dump(), size)
        return answer(client_id, rnd, step)
