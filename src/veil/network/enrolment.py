"""Who may talk to a veil server: enrolment, device tokens, revocation, the admin token.

Shared by the federated server (:mod:`veil.network.server`, also under secure
aggregation) and DSSGD's parameter server (:mod:`veil.network.dssgd`). A device
token is random (``secrets.token_urlsafe(32)``), handed out once at enrolment and
kept only as its SHA-256 in the server's :class:`~veil.network.store.StateStore`.
The admin token (for revocation) is made on first start, written once to
``STATE/admin_token`` (owner-only) and kept as a hash too. Every check answers with a
:class:`~veil.errors.ServiceError` whose status the app sends (401, 403, 404, 409,
422).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import stat
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from veil.errors import ServiceError
from veil.network.store import hash_token

__all__ = ["Enrolment", "IdentityStore"]

logger = logging.getLogger(__name__)


class IdentityStore(Protocol):
    """What :class:`Enrolment` needs of a store (``StateStore`` has it)."""

    folder: Path

    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def enrol(self, client_id: int, token_sha256: str) -> None: ...
    def revoke(self, client_id: int) -> None: ...
    def clients(self) -> dict[str, tuple[int, bool]]: ...


class Enrolment:
    """The enrolled clients of one server and its admin token.

    Args:
        store: where clients and the admin token's hash are kept.
        num_clients: client ids are ``0 .. num_clients - 1``.
        enrolment_key: when set, enrolling needs it (compared in constant time).
        lock: the server's lock, held while the set of clients changes.
    """

    def __init__(
        self,
        store: IdentityStore,
        num_clients: int,
        enrolment_key: str | None,
        lock: AbstractContextManager[Any],
    ) -> None:
        self.store = store
        self.num_clients = num_clients
        self._key = enrolment_key
        self._lock = lock
        self._tokens = store.clients()  # token hash -> (client id, revoked)
        self._admin_sha256 = self._admin_hash()

    def _admin_hash(self) -> str:
        stored = self.store.get_meta("admin_sha256")
        if stored is not None:
            return stored
        token = secrets.token_urlsafe(32)
        path = self.store.folder / "admin_token"
        path.write_text(token + "\n")
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        digest = hash_token(token)
        self.store.set_meta("admin_sha256", digest)
        return digest

    def counts(self) -> tuple[int, int]:
        """Clients enrolled (revoked included) and revoked."""
        tokens = list(self._tokens.values())
        return len(tokens), sum(1 for _, revoked in tokens if revoked)

    def enrol(self, client_id: int | None, key: str | None) -> tuple[int, str]:
        """Enrol a client (``client_id``, or the lowest free one); return its id
        and token. The token is returned once and stored only as a hash."""
        if self._key is not None and not (
            key is not None and hmac.compare_digest(key.encode(), self._key.encode())
        ):
            raise ServiceError("enrolling needs the server's enrolment key", 401)
        with self._lock:
            taken = {k for k, _ in self._tokens.values()}
            if client_id is None:
                free = [k for k in range(self.num_clients) if k not in taken]
                if not free:
                    raise ServiceError("every client id is taken", 409)
                client_id = free[0]
            if not 0 <= client_id < self.num_clients:
                raise ServiceError(
                    f"client_id must be in [0, {self.num_clients}), got {client_id}",
                    422,
                )
            if client_id in taken:
                raise ServiceError(
                    f"client {client_id} is already enrolled; use its token, or "
                    "another id",
                    409,
                )
            token = secrets.token_urlsafe(32)
            digest = hash_token(token)
            self.store.enrol(client_id, digest)
            self._tokens[digest] = (client_id, False)
        logger.info("enrolled client %d", client_id)
        return client_id, token

    def authenticate(self, token: str | None) -> int:
        """The client id of a device token; 401 unknown, 403 revoked."""
        if not token:
            raise ServiceError(
                "requests must carry the device token: 'Authorization: Bearer TOKEN'",
                401,
            )
        found = self._tokens.get(hash_token(token))
        if found is None:
            raise ServiceError("token is unknown: enrol first (POST /v1/enrol)", 401)
        client_id, revoked = found
        if revoked:
            raise ServiceError(f"client {client_id}'s token was revoked", 403)
        return client_id

    def check_admin(self, token: str | None) -> None:
        """Refuse (401) anything but the admin token (``STATE/admin_token``)."""
        ok = token is not None and hmac.compare_digest(
            hash_token(token), self._admin_sha256
        )
        if not ok:
            raise ServiceError(
                "this request needs the admin token (the server's admin_token file)",
                401,
            )

    def revoke(self, client_id: int) -> None:
        """Revoke ``client_id``: its token is refused from now on."""
        with self._lock:
            found = [h for h, (k, _) in self._tokens.items() if k == client_id]
            if not found:
                raise ServiceError(f"client {client_id} is not enrolled", 404)
            self.store.revoke(client_id)
            self._tokens[found[0]] = (client_id, True)
        logger.info("revoked client %d", client_id)
