"""The HTTP face of DSSGD's parameter server (FastAPI): what devices and admins call.

Shared with the federated server's app (:mod:`veil.network.app`): ``POST
/v1/enrol``, ``POST /v1/clients/{k}/revoke``, ``GET /v1/config``, ``GET
/v1/status``, with the same bodies. DSSGD's own, all with the device token:

- ``POST /v1/dssgd/turn?wait=S`` -> 200 the turn (:class:`TurnResponse`), 204 not
  this client's turn within ``S`` seconds (at most 10; default 0: answer at once;
  retry after ``Retry-After`` seconds), 410 the run is over;
- ``GET /v1/dssgd/turns/{turn}/download`` -> the download, sparse safetensors
  (``veil.sparse/1``), with the turn as JSON in the ``X-Veil-Turn`` header;
- ``POST /v1/dssgd/turns/{turn}/upload`` with ``X-Veil-Result: {"loss",
  "over_budget", "metrics"}`` and the sparse upload as body -> 201 ``{"turn",
  "version", "staleness"}`` once applied and committed;
- ``POST /v1/dssgd/turns/{turn}/abandon`` -> the turn ends without an upload (as
  expired: a synchronous order skips it, ``async`` frees its place);
- ``GET /v1/dssgd/ledger`` -> the privacy events recorded for this client.

Every refusal is JSON ``{"error": message}`` with a 4xx status, sent before any
state changes: 401 unknown token, 403 revoked token or another client's turn, 404 a
turn never granted, 409 a turn already applied or expired (a duplicate upload), 413
body over the limit, 415 pickle bytes, 400 malformed safetensors or
``X-Veil-Result``, 422 wrong tensors or dtypes, too many entries, bad indices, NaN
or Inf, values over the bound.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, Header, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from veil._wire import read_body
from veil.errors import ServiceError
from veil.network.app import (
    RETRY_AFTER,
    Bearer,
    ErrorBody,
    _token,
    add_enrolment_routes,
    problems,
)
from veil.network.dssgd import MAX_WAIT, DSSGDService, TurnResult

__all__ = [
    "WAITING_THREADS",
    "TurnApplied",
    "TurnResponse",
    "TurnResultHeader",
    "create_dssgd_app",
]

logger = logging.getLogger(__name__)

_MAX_METRICS = 32
#: Turn requests that may wait at once (each in its own thread); more queue.
WAITING_THREADS = 256
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422)
}
_SPARSE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    }
}


class TurnResponse(BaseModel):
    """A granted turn (see :class:`veil.network.dssgd.TurnGrant`)."""

    turn: int
    round: int
    client_id: int
    seed: int
    version: int
    size: int
    download_count: int
    download_bytes: int
    upload_capacity: int
    seconds_left: float


class TurnResultHeader(BaseModel):
    """The ``X-Veil-Result`` header of an upload."""

    loss: FiniteFloat
    over_budget: bool = False
    metrics: Annotated[
        dict[Annotated[str, Field(max_length=64)], FiniteFloat],
        Field(max_length=_MAX_METRICS),
    ] = {}


class TurnApplied(BaseModel):
    """An upload applied: the server's version after it and its staleness."""

    turn: int
    version: int
    staleness: int


def _parse_result(raw: str | None) -> TurnResult:
    if raw is None:
        raise ServiceError(
            "uploads must carry the X-Veil-Result header: JSON {loss, over_budget, "
            "metrics}",
            400,
        )
    try:
        meta = TurnResultHeader.model_validate_json(raw)
    except ValidationError as exc:
        raise ServiceError(
            "X-Veil-Result must be JSON {finite loss, over_budget: bool, metrics: "
            f"name -> finite number}}, got: {problems(exc)}",
            400,
        ) from None
    return TurnResult(meta.loss, meta.over_budget, dict(meta.metrics))


def create_dssgd_app(service: DSSGDService) -> FastAPI:
    """The FastAPI app serving ``service`` (see the module docstring)."""
    app = FastAPI(
        title="veil DSSGD parameter server",
        description="Distributed selective SGD turns for enrolled devices.",
        version="1",
    )

    add_enrolment_routes(app, service.enrolment)

    @app.get("/v1/config")
    def config() -> dict[str, Any]:
        """The method and experiment config devices build their client side from."""
        return {"method": "dssgd", "config": service.config}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        """Turns done, in flight and expired, clients, bytes, ledger entries."""
        return service.status()

    @app.post(
        "/v1/dssgd/turn",
        response_model=TurnResponse,
        responses={
            **_ERRORS,
            204: {"description": "Not this client's turn now; ask again later"},
            410: {"model": ErrorBody, "description": "The run is over"},
        },
    )
    async def turn(
        credentials: Bearer,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0.0,
    ) -> Any:
        """Ask for a turn: granted (with its download made) or, after waiting up
        to ``wait`` seconds for one, not now."""
        client_id = service.authenticate(_token(credentials))
        # Waiting requests sleep in threads of their own, so that they never
        # hold the threads that serve downloads and uploads.
        if getattr(app.state, "waiting", None) is None:
            app.state.waiting = anyio.CapacityLimiter(WAITING_THREADS)
        grant = await anyio.to_thread.run_sync(
            service.request_turn, client_id, wait, limiter=app.state.waiting
        )
        if grant is None:
            return Response(status_code=204, headers={"Retry-After": str(RETRY_AFTER)})
        return TurnResponse(**grant.__dict__)

    @app.get(
        "/v1/dssgd/turns/{turn}/download",
        responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
        response_class=Response,
    )
    def download(turn: int, credentials: Bearer) -> Response:
        """The turn's download: sparse safetensors, the same bytes on every call."""
        client_id = service.authenticate(_token(credentials))
        payload, grant = service.download(client_id, turn)
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"X-Veil-Turn": json.dumps(grant.__dict__)},
        )

    @app.post(
        "/v1/dssgd/turns/{turn}/upload",
        status_code=201,
        responses=_ERRORS,
        openapi_extra=_SPARSE_BODY,
    )
    async def upload(
        turn: int,
        request: Request,
        credentials: Bearer,
        x_veil_result: Annotated[str | None, Header()] = None,
    ) -> TurnApplied:
        """Upload the turn's sparse change (safetensors body)."""
        client_id = service.authenticate(_token(credentials))
        result = _parse_result(x_veil_result)
        await run_in_threadpool(service.check_target, client_id, turn)
        payload = await read_body(request, service.max_body_bytes())
        outcome = await run_in_threadpool(
            service.accept, client_id, turn, payload, result
        )
        return TurnApplied(**outcome.__dict__)

    @app.post("/v1/dssgd/turns/{turn}/abandon", responses=_ERRORS)
    def abandon(turn: int, credentials: Bearer) -> dict[str, Any]:
        """Give a turn back without an upload (it ends as expired)."""
        client_id = service.authenticate(_token(credentials))
        service.abandon(client_id, turn)
        return {"turn": turn, "abandoned": True}

    @app.get("/v1/dssgd/ledger", responses=_ERRORS)
    def ledger(credentials: Bearer) -> dict[str, Any]:
        """The privacy events the server recorded for this client's uploads."""
        client_id = service.authenticate(_token(credentials))
        return {"client_id": client_id, "events": service.ledger_events(client_id)}

    return app
