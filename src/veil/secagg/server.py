"""The server's side of a secure aggregation round, as a state machine.

The server relays messages and, at the end, removes the masks it is allowed to
remove. Its steps, each closed by a ``finish_*`` call once the step's messages are in
(or its deadline passed):

1. advertise keys: collect public keys; broadcast each client's neighbours' keys;
2. share keys: collect sealed shares; forward each to its recipient;
3. masked input: collect masked vectors; name, to each survivor, its neighbours that
   are in the sum and those that dropped after sharing keys;
4. unmasking: collect shares; reconstruct the survivors' self-mask seeds and the
   dropped clients' mask keys (each checked against what the client advertised), and
   return the sum of the survivors' inputs modulo ``2**bits``.

A malformed, forged (naming another sender) or replayed (a second message of a step,
another round's message, another client's keys) message drops its sender from the
round and the round goes on. A client dropped before the masked input is simply not
in the sum; one dropped after it stays in the sum (its input cannot be removed without
both of its secrets, which are never both revealed). When fewer than ``threshold``
clients remain, or a needed secret has fewer than ``threshold`` holders left, the
round aborts with :class:`~veil.errors.RoundAbortedError` and returns nothing.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from veil.errors import MessageError, RoundAbortedError, SecAggError
from veil.secagg._common import Step, mask_add, pair_mask, reduce_bits, self_mask
from veil.secagg.crypto import KEY_BYTES, commit, public_from_private
from veil.secagg.fixedpoint import dtype_for_bits
from veil.secagg.graph import min_threshold, neighbour_graph
from veil.secagg.messages import (
    AdvertiseKeys,
    ClientKeys,
    ForwardedShares,
    KeysBroadcast,
    MaskedInput,
    Message,
    RoundConfig,
    SecretKind,
    SharedKeys,
    UnmaskRequest,
    UnmaskShares,
    decode,
)
from veil.secagg.shamir import SECRET_BYTES, holder_x, interpolate, reconstruct

__all__ = ["SecAggServer"]

logger = logging.getLogger(__name__)

# Subsets of shares tried when the first reconstruction fails its check.
_MAX_SUBSETS = 64

_CLIENT_KINDS = (AdvertiseKeys, SharedKeys, MaskedInput, UnmaskShares)
_KINDS = {
    Step.ADVERTISE_KEYS: AdvertiseKeys,
    Step.SHARE_KEYS: SharedKeys,
    Step.MASKED_INPUT: MaskedInput,
    Step.UNMASKING: UnmaskShares,
}


class SecAggServer:
    """The server of one round.

    Args:
        round: the round number, >= 0.
        clients: the invited client ids.
        length: elements per input vector, >= 1.
        bits: width b of the modulus ``2**b``, in [2, 64].
        threshold: t, shares needed to reconstruct a secret; more than half of each
            client's holders (itself and its neighbours), at most all of them.
        neighbours: k for SecAgg+ (even, >= 2); 0 for the full graph.
        graph_seed: 32 public bytes fixing the graph; fresh random bytes by default.
    """

    def __init__(
        self,
        round: int,
        clients: Iterable[int],
        length: int,
        bits: int,
        threshold: int,
        neighbours: int = 0,
        graph_seed: bytes | None = None,
    ) -> None:
        ids = tuple(sorted(set(clients)))
        if len(ids) < 2:
            raise SecAggError(
                f"a secure sum needs at least 2 clients (the sum of one is its input), "
                f"got {len(ids)}"
            )
        if length < 1:
            raise SecAggError(f"length must be >= 1, got {length}")
        dtype_for_bits(bits)
        seed = os.urandom(KEY_BYTES) if graph_seed is None else graph_seed
        self.graph = neighbour_graph(ids, neighbours, seed)
        holders = min(len(v) for v in self.graph.values()) + 1
        if not min_threshold(holders) <= threshold <= holders:
            raise SecAggError(
                f"threshold must be in [{min_threshold(holders)}, {holders}] for "
                f"{holders} share holders per client (more than half), got "
                f"{threshold}"
            )
        self.config = RoundConfig(round, bits, length, threshold, neighbours, seed, ids)
        self.dropped: dict[int, str] = {}
        self._step = Step.ADVERTISE_KEYS
        self._active = set(ids)  # clients still expected to send this step
        self._received: dict[int, object] = {}
        self._keys: dict[int, AdvertiseKeys] = {}
        self._shares: dict[int, SharedKeys] = {}
        self._inputs: dict[int, MaskedInput] = {}
        self._reveals: dict[int, UnmaskShares] = {}
        self._requests: dict[int, UnmaskRequest] = {}
        self._u2: set[int] = set()
        self._u3: set[int] = set()
        self._aborted: str | None = None
        self._done = False

    # ---- bookkeeping --------------------------------------------------------

    @property
    def step(self) -> Step:
        """The step whose messages the server is collecting."""
        return self._step

    @property
    def included(self) -> tuple[int, ...]:
        """Clients whose input is in the sum (known after the masked input step)."""
        return tuple(sorted(self._u3))

    def round_config(self) -> bytes:
        """The broadcast that opens the round."""
        return self.config.encode()

    def _drop(self, client: int, reason: str) -> None:
        if client not in self.dropped:
            self.dropped[client] = reason
            logger.info(
                "round %d: client %d dropped: %s", self.config.round, client, reason
            )
        self._active.discard(client)
        self._received.pop(client, None)

    def _expect_step(self, step: Step) -> None:
        if self._aborted is not None:
            raise RoundAbortedError(f"the round was aborted: {self._aborted}")
        if self._step != step or self._done:
            raise SecAggError(
                f"the server is collecting {self._step.name}, not {step.name}"
            )

    def _abort(self, reason: str) -> RoundAbortedError:
        self._aborted = reason
        logger.warning("round %d aborted: %s", self.config.round, reason)
        return RoundAbortedError(f"round {self.config.round} aborted: {reason}")

    def _need(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise self._abort(
                f"{count} clients {what}, fewer than the threshold "
                f"{self.config.threshold}; no sum is returned"
            )

    def receive(self, sender: int, data: bytes) -> bool:
        """Take one message that arrived from ``sender`` (the transport's identity of
        the client) during the current step.

        Returns:
            True if it was accepted; False if it was refused, in which case ``sender``
            is dropped from the round (reason in :attr:`dropped`).
        """
        if self._aborted is not None:
            raise RoundAbortedError(f"the round was aborted: {self._aborted}")
        if sender not in self._active:
            logger.info(
                "round %d: ignored a message from client %d", self.config.round, sender
            )
            return False
        try:
            message = self.check(sender, data)
        except MessageError as exc:
            self._drop(sender, f"{self._step.name}: {exc}")
            return False
        self._received[sender] = message
        return True

    def check(self, sender: int, data: bytes) -> Message:
        """The message in ``data`` if :meth:`receive` would accept it from
        ``sender`` now; changes nothing (a transport can refuse a bad request
        without dropping its sender).

        Raises:
            MessageError: what is wrong with the message, or the sender is not
                expected to send it now.
        """
        if sender not in self._active or self._aborted is not None or self._done:
            raise MessageError(
                f"client {sender} takes no part in {self._step.name} now"
            )
        message = decode(data)
        kind = _KINDS[self._step]
        if not isinstance(message, _CLIENT_KINDS) or not isinstance(message, kind):
            raise MessageError(
                f"expected {kind.__name__}, got {type(message).__name__}"
            )
        if message.round != self.config.round:
            raise MessageError(
                f"message is for round {message.round}, not {self.config.round}"
            )
        if message.sender != sender:
            raise MessageError(
                f"message names sender {message.sender} but came from {sender}"
            )
        if sender in self._received:
            raise MessageError(f"second {kind.__name__} in one step (a replay)")
        self._check(sender, message)
        return message

    def _check(self, sender: int, message: object) -> None:
        cfg = self.config
        if isinstance(message, SharedKeys):
            expected = sorted(self.graph[sender] & set(self._keys))
            if [r for r, _ in message.ciphertexts] != expected:
                raise MessageError("shares must be addressed to every neighbour once")
        elif isinstance(message, MaskedInput):
            v = message.vector
            if message.bits != cfg.bits or len(v) != cfg.length:
                raise MessageError(
                    f"masked input must be {cfg.length} elements of {cfg.bits} bits, "
                    f"got {len(v)} of {message.bits}"
                )
            if cfg.bits < 8 * v.dtype.itemsize and int(v.max(initial=0)) >> cfg.bits:
                raise MessageError(f"masked input values must be < 2**{cfg.bits}")
            if not set(message.complaints) <= self.graph[sender] & self._u2:
                raise MessageError("complaints about clients that sent no shares to it")
        elif isinstance(message, UnmaskShares):
            request = self._requests[sender]
            for client, kind, _ in message.shares:
                wanted = (
                    SecretKind.SELF_MASK_SEED
                    if client in request.survivors
                    else SecretKind.MASK_KEY
                    if client in request.dropped
                    else None
                )
                if kind != wanted:
                    raise MessageError(f"a share of client {client} was not asked for")

    def _collected(self) -> dict[int, object]:
        """The step's accepted messages; the step's silent clients are dropped."""
        for c in sorted(self._active - set(self._received)):
            self._drop(c, f"{self._step.name}: no message (dropped out)")
        got, self._received = self._received, {}
        return got

    def _prune(self, alive: set[int], what: str) -> set[int]:
        """Drop clients of ``alive`` with fewer than ``threshold`` holders in it."""
        changed = True
        while changed:
            changed = False
            for c in sorted(alive):
                if len((self.graph[c] & alive) | {c}) < self.config.threshold:
                    alive.discard(c)
                    self._drop(c, f"{what}: too few neighbours left to hold its shares")
                    changed = True
        return alive

    # ---- the four steps -------------------------------------------------------

    def finish_advertise_keys(self) -> dict[int, bytes]:
        """Close advertise keys; the key broadcast for each remaining client."""
        self._expect_step(Step.ADVERTISE_KEYS)
        keys = {
            c: m for c, m in self._collected().items() if isinstance(m, AdvertiseKeys)
        }
        # the same public key from two clients is a replay: drop both
        seen: dict[bytes, int] = {}
        for c, m in sorted(keys.items()):
            for k in (m.encryption_key, m.mask_key):
                if k in seen:
                    for bad in (c, seen[k]):
                        keys.pop(bad, None)
                        self._drop(bad, "ADVERTISE_KEYS: public key advertised twice")
                seen.setdefault(k, c)
        alive = self._prune(set(keys), "ADVERTISE_KEYS")
        self._keys = {c: keys[c] for c in sorted(alive)}
        self._need(len(self._keys), "advertised keys")
        self._step, self._active = Step.SHARE_KEYS, set(self._keys)
        out = {}
        for c in self._keys:
            entries = [
                ClientKeys(u, m.encryption_key, m.mask_key, m.seed_commitment)
                for u, m in self._keys.items()
                if u == c or u in self.graph[c]
            ]
            out[c] = KeysBroadcast(self.config.round, c, tuple(entries)).encode()
        return out

    def finish_share_keys(self) -> dict[int, bytes]:
        """Close share keys; the forwarded shares for each remaining client."""
        self._expect_step(Step.SHARE_KEYS)
        shares = {
            c: m for c, m in self._collected().items() if isinstance(m, SharedKeys)
        }
        self._u2 = self._prune(set(shares), "SHARE_KEYS")
        self._shares = {c: shares[c] for c in sorted(self._u2)}
        self._need(len(self._u2), "shared keys")
        inbox: dict[int, list[tuple[int, bytes]]] = {c: [] for c in self._shares}
        for u, m in self._shares.items():
            for v, blob in m.ciphertexts:
                if v in inbox:
                    inbox[v].append((u, blob))
        self._step, self._active = Step.MASKED_INPUT, set(self._u2)
        return {
            v: ForwardedShares(self.config.round, v, tuple(sorted(got))).encode()
            for v, got in inbox.items()
        }

    def finish_masked_input(self) -> dict[int, bytes]:
        """Close masked input; the unmask request for each client in the sum."""
        self._expect_step(Step.MASKED_INPUT)
        inputs = {
            c: m for c, m in self._collected().items() if isinstance(m, MaskedInput)
        }
        for v, m in sorted(inputs.items()):
            for u in m.complaints:
                self._drop(u, f"MASKED_INPUT: client {v} could not open its shares")
        self._u3 = set(inputs) - set(self.dropped)
        self._inputs = {c: inputs[c] for c in sorted(self._u3)}
        self._need(len(self._u3), "sent a masked input")
        self._check_holders()
        self._requests = {
            v: UnmaskRequest(
                self.config.round,
                v,
                tuple(sorted((self.graph[v] | {v}) & self._u3)),
                tuple(sorted((self.graph[v] & self._u2) - self._u3)),
            )
            for v in sorted(self._u3)
        }
        self._step, self._active = Step.UNMASKING, set(self._u3)
        return {v: r.encode() for v, r in self._requests.items()}

    def _needed_secrets(self) -> dict[int, SecretKind]:
        """Which secret of which client the sum needs."""
        needed = {u: SecretKind.SELF_MASK_SEED for u in self._u3}
        for u in self._u2 - self._u3:
            if self.graph[u] & self._u3:
                needed[u] = SecretKind.MASK_KEY
        return needed

    def _check_holders(self) -> None:
        for u, kind in sorted(self._needed_secrets().items()):
            holders = len((self.graph[u] | {u}) & self._u3)
            if holders < self.config.threshold:
                raise self._abort(
                    f"the {kind.name.lower()} of client {u} has {holders} holders "
                    f"left, fewer than the threshold {self.config.threshold}"
                )

    def finish_unmasking(self) -> np.ndarray:
        """Close unmasking; the sum of the included clients' inputs modulo
        ``2**bits`` (a 1-D array of the round's unsigned type)."""
        self._expect_step(Step.UNMASKING)
        self._reveals = {
            c: m for c, m in self._collected().items() if isinstance(m, UnmaskShares)
        }
        self._need(len(self._reveals), "answered the unmask request")
        secrets = self._reconstruct_all()
        total = self._unmask(secrets)
        self._done = True
        self._active = set()
        logger.info(
            "round %d: summed %d inputs, %d clients dropped",
            self.config.round,
            len(self._u3),
            len(self.dropped),
        )
        return total

    # ---- reconstruction -------------------------------------------------------

    def _reconstruct_all(self) -> dict[int, bytes]:
        points: dict[int, dict[int, int]] = {}
        for v, m in self._reveals.items():
            for u, _, value in m.shares:
                points.setdefault(u, {})[v] = value
        secrets = {}
        for u, kind in sorted(self._needed_secrets().items()):
            got = {v: y for v, y in points.get(u, {}).items() if v in self._reveals}
            secret = self._recover(u, kind, got)
            if secret is None:
                raise self._abort(
                    f"the {kind.name.lower()} of client {u} could not be reconstructed "
                    f"from {len(got)} shares (threshold {self.config.threshold})"
                )
            secrets[u] = secret
        return secrets

    def _verifier(self, u: int, kind: SecretKind) -> Callable[[bytes], bool]:
        keys = self._keys[u]
        if kind == SecretKind.SELF_MASK_SEED:
            return lambda s: commit(s) == keys.seed_commitment
        return lambda s: public_from_private(s) == keys.mask_key

    def _recover(
        self, u: int, kind: SecretKind, shares: dict[int, int]
    ) -> bytes | None:
        """The secret from ``shares`` (holder -> value), checked against what ``u``
        advertised. If the ``threshold`` shares of the smallest ids fail the check,
        random subsets are tried; holders whose shares disagree with a verified
        polynomial are dropped and their other shares ignored."""
        t, verify = self.config.threshold, self._verifier(u, kind)
        holders = sorted(shares)
        if len(holders) < t:
            return None
        for i, subset in enumerate(self._subsets(u, holders, t)):
            try:
                secret = reconstruct({h: shares[h] for h in subset}, t)
            except SecAggError:
                continue
            if verify(secret):
                if i > 0:
                    self._drop_liars(u, subset, shares)
                return secret
        return None

    @staticmethod
    def _subsets(u: int, holders: list[int], t: int) -> Iterator[list[int]]:
        """The first ``t`` holders, then (only if asked for) random subsets."""
        yield holders[:t]
        if len(holders) > t:
            rng = random.Random(u)
            for _ in range(_MAX_SUBSETS):
                yield sorted(rng.sample(holders, t))

    def _drop_liars(self, u: int, subset: list[int], shares: dict[int, int]) -> None:
        points = {holder_x(h): shares[h] for h in subset}
        for h in sorted(set(shares) - set(subset)):
            if interpolate(points, holder_x(h)) != shares[h]:
                self._reveals.pop(h, None)
                self._drop(h, f"UNMASKING: sent a wrong share of client {u}")

    def _unmask(self, secrets: dict[int, bytes]) -> np.ndarray:
        cfg = self.config
        dtype = dtype_for_bits(cfg.bits)
        total = np.zeros(cfg.length, dtype=dtype)
        for m in self._inputs.values():
            mask_add(total, m.vector, +1)
        for u, secret in sorted(secrets.items()):
            assert len(secret) == SECRET_BYTES
            if u in self._u3:
                mask_add(total, self_mask(secret, cfg.round, cfg.length, cfg.bits), -1)
                continue
            for v in sorted(self.graph[u] & self._u3):
                # v added +mask if v < u, -mask if v > u: take it back out
                mask = pair_mask(
                    secret,
                    self._keys[v].mask_key,
                    cfg.round,
                    u,
                    v,
                    cfg.length,
                    cfg.bits,
                )
                mask_add(total, mask, -1 if v < u else +1)
        return reduce_bits(total, cfg.bits)
