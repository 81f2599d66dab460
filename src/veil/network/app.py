"""The HTTP face of the federated server (FastAPI): what devices and admins call.

Endpoints (all under ``/v1``; OpenAPI at ``/openapi.json``, docs at ``/docs``):

- ``POST /v1/enrol``: JSON ``{"client_id": int | null}`` (with ``Authorization:
  Bearer KEY`` when the server has an enrolment key) -> 201 ``{"client_id",
  "token"}``. The token is shown once; the server keeps only its SHA-256.
- ``POST /v1/clients/{client_id}/revoke``: admin token -> the client's token is
  refused from now on.
- ``GET /v1/config``: the method and the experiment config devices build from.
- ``GET /v1/status``: open round, rounds aggregated and failed, clients, updates,
  epsilon spent (from the ledger).
- ``GET /v1/task?wait=S``: device token -> 200 the task (round, client id, seed,
  settings), 204 nothing to do now (retry after ``Retry-After`` seconds), 410 the
  run is over. With ``wait`` (seconds, 0 to 10, default 0: answer at once) a
  request with no task yet is held (a long poll, on the event loop) until the
  client has a task, a round opens without one for it (204), ``S`` seconds pass
  (204), or the run ends (410): devices learn of a new round at once without
  polling in a loop.
- ``GET /v1/rounds/{round}/model``: device token -> the global model, safetensors.
- ``POST /v1/rounds/{round}/update``: device token, ``X-Veil-Result`` JSON header
  ``{"num_examples", "loss", "metrics"}``, body the update as safetensors ->
  201 once stored.

Every refusal is JSON ``{"error": message}`` with a 4xx status, sent before any
state changes: 401 unknown token, 403 revoked token or a client the round did not
pick, 409 wrong round or duplicate update, 413 body over the limit (from
``Content-Length`` before reading, then while counting the stream), 415 pickle or
``torch.save`` bytes (never loaded), 400 malformed safetensors or metadata, 422
wrong tensor names, dtypes or shapes, NaN or Inf, or a norm over the bound.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from veil._wire import read_body
from veil.errors import ServiceError
from veil.network.enrolment import Enrolment
from veil.network.server import FederatedServer, ResultMetadata

__all__ = [
    "MAX_TASK_WAIT",
    "RETRY_AFTER",
    "Accepted",
    "EnrolRequest",
    "EnrolResponse",
    "ErrorBody",
    "ResultHeader",
    "Revoked",
    "TaskResponse",
    "add_enrolment_routes",
    "create_app",
    "problems",
]

logger = logging.getLogger(__name__)

#: Seconds a device should wait before asking again when there is no work.
RETRY_AFTER = 1
#: The longest a ``GET /v1/task?wait=S`` request may be held, in seconds.
MAX_TASK_WAIT = 10.0
_MAX_METRICS = 32
# The most examples one update may report: far above any phone, far below what
# SQLite (int64) and the float64 weights can hold exactly.
MAX_EXAMPLES = 2**31 - 1

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class EnrolRequest(BaseModel):
    """Body of ``POST /v1/enrol``: the client id wanted, or none for any free one."""

    client_id: Annotated[int, Field(ge=0)] | None = None


class EnrolResponse(BaseModel):
    """The enrolled client's id and token (shown once)."""

    client_id: int
    token: str


class TaskResponse(BaseModel):
    """A client's task: train from the round's model with this seed and settings."""

    round: int
    client_id: int
    seed: int
    settings: dict[str, float]
    seconds_left: float


class ResultHeader(BaseModel):
    """The ``X-Veil-Result`` header: what the device says about its update."""

    num_examples: Annotated[int, Field(ge=1, le=MAX_EXAMPLES)]
    loss: FiniteFloat
    metrics: Annotated[
        dict[Annotated[str, Field(max_length=64)], FiniteFloat],
        Field(max_length=_MAX_METRICS),
    ] = {}


class Accepted(BaseModel):
    """An update stored."""

    round: int
    client_id: int


class Revoked(BaseModel):
    """A client revoked."""

    client_id: int
    revoked: bool


class ErrorBody(BaseModel):
    """Every refusal: what was wrong."""

    error: str


_bearer = HTTPBearer(auto_error=False)
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 409, 413, 415, 422)
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


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return None if credentials is None else credentials.credentials


def problems(exc: ValidationError | RequestValidationError) -> str:
    """The first five problems pydantic found, as ``where: what; ...``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'header'}: {e['msg']}"
        for e in exc.errors()[:5]
    )


def _parse_result(raw: str | None) -> ResultMetadata:
    if raw is None:
        raise ServiceError(
            "uploads must carry the X-Veil-Result header: JSON {num_examples, loss, "
            "metrics}",
            400,
        )
    try:
        meta = ResultHeader.model_validate_json(raw)
    except ValidationError as exc:
        raise ServiceError(
            f"X-Veil-Result must be JSON {{num_examples in [1, {MAX_EXAMPLES}], finite "
            "loss, metrics: "
            f"name -> finite number}}, got: {problems(exc)}",
            400,
        ) from None
    return ResultMetadata(meta.num_examples, meta.loss, dict(meta.metrics))


def add_enrolment_routes(app: FastAPI, enrolment: Enrolment) -> None:
    """What every veil server app shares: JSON errors (a :class:`ServiceError`'s
    status; 422 for a request FastAPI could not parse), ``POST /v1/enrol`` and
    ``POST /v1/clients/{client_id}/revoke``."""

    @app.exception_handler(ServiceError)
    async def _refused(request: Request, exc: ServiceError) -> JSONResponse:
        logger.info("refused %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": problems(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (unknown path, a body it cannot parse) in the
        # same {"error": ...} shape as veil's.
        return JSONResponse(
            {"error": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.post("/v1/enrol", status_code=201, responses=_ERRORS)
    def enrol(body: EnrolRequest, credentials: Bearer) -> EnrolResponse:
        """Enrol a device as a client; the token is returned once."""
        client_id, token = enrolment.enrol(body.client_id, _token(credentials))
        return EnrolResponse(client_id=client_id, token=token)

    @app.post("/v1/clients/{client_id}/revoke", responses=_ERRORS)
    def revoke(client_id: int, credentials: Bearer) -> Revoked:
        """Revoke a client's token (admin token required)."""
        enrolment.check_admin(_token(credentials))
        enrolment.revoke(client_id)
        return Revoked(client_id=client_id, revoked=True)


def create_app(server: FederatedServer) -> FastAPI:
    """The FastAPI app serving ``server`` (see the module docstring)."""
    app = FastAPI(
        title="veil federated server",
        description="Federated rounds (FedAvg, DP-FedAvg) for enrolled devices.",
        version="1",
    )
    # Called by the uvicorn runner before it stops: held task requests answer
    # 204 at once instead of keeping the server up for their wait.
    app.state.release_waiters = server.wakeup.close

    add_enrolment_routes(app, server.enrolment)

    @app.get("/v1/config")
    def config() -> dict[str, Any]:
        """The method and experiment config devices build their client side from."""
        return {"method": server.method, "config": server.config}

    @app.get("/v1/status")
    def status() -> dict[str, Any]:
        """The open round, rounds done, clients, updates and epsilon spent."""
        return server.status()

    @app.get(
        "/v1/task",
        response_model=TaskResponse,
        responses={
            **_ERRORS,
            204: {"description": "No work for this client now; ask again later"},
            410: {"model": ErrorBody, "description": "The run is over"},
        },
    )
    async def task(
        credentials: Bearer,
        wait: Annotated[
            float,
            Query(
                ge=0,
                le=MAX_TASK_WAIT,
                description="Seconds to hold the request while this client has "
                "no task (0 to 10; 0 answers at once). It is answered as soon as "
                "the client has a task, a round opens, or the run ends.",
            ),
        ] = 0.0,
    ) -> Any:
        """This client's task in the open round, if it has one (waiting up to
        ``wait`` seconds for one)."""
        client_id = server.authenticate(_token(credentials))
        info = await server.wait_for_task(client_id, wait)
        if info is None:
            return Response(status_code=204, headers={"Retry-After": str(RETRY_AFTER)})
        return TaskResponse(**info.__dict__)

    @app.get(
        "/v1/rounds/{rnd}/model",
        responses={
            **_ERRORS,
            200: {"content": {"application/octet-stream": {}}},
        },
        response_class=Response,
    )
    async def model(rnd: int, credentials: Bearer) -> Response:
        """The open round's global model, as safetensors."""
        server.authenticate(_token(credentials))
        return Response(server.model_bytes(rnd), media_type="application/octet-stream")

    @app.post(
        "/v1/rounds/{rnd}/update",
        status_code=201,
        responses=_ERRORS,
        openapi_extra=_SAFETENSORS_BODY,
    )
    async def update(
        rnd: int,
        request: Request,
        credentials: Bearer,
        x_veil_result: Annotated[str | None, Header()] = None,
    ) -> Accepted:
        """Upload this client's update for round ``rnd`` (safetensors body)."""
        client_id = server.authenticate(_token(credentials))
        meta = _parse_result(x_veil_result)
        server.check_target(client_id, rnd)
        payload = await read_body(request, server.max_body_bytes())
        await server.accept_async(client_id, rnd, payload, meta)
        return Accepted(round=rnd, client_id=client_id)

    from veil.network.secagg import SecureFederatedServer

    if isinstance(server, SecureFederatedServer):
        from veil.network.secagg_app import add_secagg_routes

        add_secagg_routes(app, server)  # docs: veil.network.secagg_app
    return app
