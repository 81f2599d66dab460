"""One client's side of a secure aggregation round, as a state machine.

A :class:`SecAggClient` holds one input vector (integers modulo ``2**bits``, already
fixed-point encoded) and answers the server's four messages in order, each answer a
message in bytes (:mod:`veil.secagg.messages`):

1. advertise keys: two fresh X25519 key pairs and a commitment to a fresh self-mask
   seed;
2. share keys: Shamir shares of the self-mask seed and of the mask private key, one
   pair per neighbour, sealed for that neighbour;
3. masked input: the vector plus the self mask plus, for every neighbour that shared
   keys, the pairwise mask (added towards larger ids, subtracted towards smaller);
4. unmasking: for each neighbour the server names, the share of its self-mask seed if
   its input is in the sum, else the share of its mask key; never both, and only once.

A message the client cannot accept raises :class:`~veil.errors.MessageError` (or
:class:`~veil.errors.RoundAbortedError` when too few clients remain); the client then
takes no further part, which the server sees as a dropout.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from veil.errors import MessageError, RoundAbortedError, SecAggError
from veil.secagg._common import (
    Step,
    expect,
    mask_add,
    pack_shares,
    pair_mask,
    reduce_bits,
    self_mask,
    share_key,
    unpack_shares,
)
from veil.secagg.crypto import (
    KEY_BYTES,
    commit,
    generate_key,
    open_sealed,
    private_bytes,
    public_bytes,
    seal,
)
from veil.secagg.fixedpoint import dtype_for_bits
from veil.secagg.graph import min_threshold, neighbours_of
from veil.secagg.messages import (
    AdvertiseKeys,
    ClientKeys,
    ForwardedShares,
    KeysBroadcast,
    MaskedInput,
    RoundConfig,
    SecretKind,
    SharedKeys,
    UnmaskRequest,
    UnmaskShares,
    decode,
    share_associated_data,
)
from veil.secagg.shamir import split

__all__ = ["SecAggClient"]

logger = logging.getLogger(__name__)


class SecAggClient:
    """A client of one round.

    Args:
        client_id: the client's id, >= 0.
        vector: its encoded input, a 1-D array of unsigned integers; checked against
            the round's length and bits when the round config arrives.
    """

    def __init__(self, client_id: int, vector: np.ndarray) -> None:
        if client_id < 0:
            raise SecAggError(f"client_id must be >= 0, got {client_id}")
        self.client_id = client_id
        self._vector = np.asarray(vector)
        self._next: Step | None = Step.ADVERTISE_KEYS
        self._peers: dict[int, ClientKeys] = {}
        self._held: dict[int, tuple[int, int]] = {}  # client -> (seed, key) shares
        self._senders: frozenset[int] = frozenset()
        self._box_keys: dict[int, bytes] = {}  # neighbour -> key sealing shares

    def _advance(self, step: Step) -> None:
        if self._next != step:
            expected = "nothing more" if self._next is None else self._next.name
            raise SecAggError(
                f"client {self.client_id} cannot run {step.name} now; it expects "
                f"{expected} (each step runs once, in order)"
            )
        self._next = Step(step + 1) if step < Step.UNMASKING else None

    def advertise_keys(self, round_config: bytes) -> bytes:
        """Check the round's parameters; answer with fresh public keys."""
        self._advance(Step.ADVERTISE_KEYS)
        config = decode(round_config)
        if not isinstance(config, RoundConfig):
            raise MessageError(f"expected a RoundConfig, got {type(config).__name__}")
        self._check_config(config)
        self.config = config

        # advertise keys: one pair to seal shares, one for pairwise masks
        self._seal_key, self._mask_key = generate_key(), generate_key()
        self._seed = os.urandom(KEY_BYTES)
        return AdvertiseKeys(
            config.round,
            self.client_id,
            public_bytes(self._seal_key),
            public_bytes(self._mask_key),
            commit(self._seed),
        ).encode()

    def _check_config(self, config: RoundConfig) -> None:
        if self.client_id not in config.clients:
            raise MessageError(f"client {self.client_id} is not invited to the round")
        v = self._vector
        dtype = dtype_for_bits(config.bits)
        if v.ndim != 1 or len(v) != config.length or v.dtype != dtype:
            raise SecAggError(
                f"input must be a 1-D {dtype} array of length {config.length}, got "
                f"{v.dtype} of shape {v.shape}"
            )
        if config.bits < 8 * dtype.itemsize and int(v.max(initial=0)) >> config.bits:
            raise SecAggError(f"input values must be < 2**{config.bits}")
        self._neighbours = neighbours_of(
            self.client_id, config.clients, config.neighbours, config.graph_seed
        )
        holders = len(self._neighbours) + 1
        if not min_threshold(holders) <= config.threshold <= holders:
            raise SecAggError(
                f"threshold must be in [{min_threshold(holders)}, {holders}] for "
                f"{holders} share holders (more than half, so that no one can "
                f"collect both secrets of a client), got {config.threshold}"
            )

    def share_keys(self, broadcast: bytes) -> bytes:
        """Check the neighbours' keys; answer with sealed shares of both secrets."""
        self._advance(Step.SHARE_KEYS)
        cfg = self.config
        msg = expect(decode(broadcast), KeysBroadcast, cfg.round, self.client_id)
        self._check_keys(msg.keys)
        holders = [*sorted(self._peers), self.client_id]
        if len(holders) < cfg.threshold:
            raise RoundAbortedError(
                f"client {self.client_id}: {len(holders)} share holders left, fewer "
                f"than the threshold {cfg.threshold}"
            )

        # share keys: Shamir shares of the seed and of the mask key, one per holder
        seed_shares = split(self._seed, holders, cfg.threshold)
        key_shares = split(private_bytes(self._mask_key), holders, cfg.threshold)
        me = self.client_id
        self._held[me] = (seed_shares[me], key_shares[me])
        ciphertexts = []
        for peer in sorted(self._peers):
            key = self._box_key(peer)
            plain = pack_shares(
                me, peer, cfg.round, seed_shares[peer], key_shares[peer]
            )
            blob = seal(key, plain, share_associated_data(cfg.round, me, peer))
            ciphertexts.append((peer, blob))
        return SharedKeys(cfg.round, me, tuple(ciphertexts)).encode()

    def _check_keys(self, keys: tuple[ClientKeys, ...]) -> None:
        me = self.client_id
        by_client = {k.client: k for k in keys}
        mine = by_client.get(me)
        if mine is None or (mine.encryption_key, mine.mask_key) != (
            public_bytes(self._seal_key),
            public_bytes(self._mask_key),
        ):
            raise MessageError(f"client {me}: its own keys are missing or altered")
        unknown = set(by_client) - self._neighbours - {me}
        if unknown:
            raise MessageError(
                f"keys of clients {sorted(unknown)} who are not neighbours"
            )
        published = [k.encryption_key for k in keys] + [k.mask_key for k in keys]
        if len(set(published)) != len(published):
            raise MessageError("two advertised public keys are equal (a replay)")
        self._peers = {c: k for c, k in by_client.items() if c != me}

    def _box_key(self, peer: int) -> bytes:
        """The key sealing shares between this client and ``peer`` (both ways)."""
        if peer not in self._box_keys:
            self._box_keys[peer] = share_key(
                self._seal_key,
                self._peers[peer].encryption_key,
                self.config.round,
                self.client_id,
                peer,
            )
        return self._box_keys[peer]

    def masked_input(self, forwarded: bytes) -> bytes:
        """Open the neighbours' shares; answer with the masked input vector."""
        self._advance(Step.MASKED_INPUT)
        cfg, me = self.config, self.client_id
        msg = expect(decode(forwarded), ForwardedShares, cfg.round, me)
        senders = {u for u, _ in msg.ciphertexts}
        if not senders <= set(self._peers):
            raise MessageError(
                f"shares from non-neighbours {sorted(senders - set(self._peers))}"
            )
        complaints = []
        for u, blob in msg.ciphertexts:
            try:
                key = self._box_key(u)
                plain = open_sealed(key, blob, share_associated_data(cfg.round, u, me))
                self._held[u] = unpack_shares(plain, u, me, cfg.round)
            except MessageError as exc:
                logger.info("client %d: shares of client %d refused: %s", me, u, exc)
                complaints.append(u)
        if len(senders) + 1 < cfg.threshold:
            raise RoundAbortedError(
                f"client {me}: {len(senders) + 1} clients shared keys, fewer than the "
                f"threshold {cfg.threshold}"
            )
        self._senders = frozenset(senders)

        # masked input: x + self mask + pairwise masks with every neighbour that shared
        y = self._vector.copy()
        mask_add(y, self_mask(self._seed, cfg.round, cfg.length, cfg.bits), +1)
        for v in sorted(senders):
            mask = pair_mask(
                self._mask_key,
                self._peers[v].mask_key,
                cfg.round,
                me,
                v,
                cfg.length,
                cfg.bits,
            )
            mask_add(y, mask, +1 if me < v else -1)
        reduce_bits(y, cfg.bits)
        return MaskedInput(cfg.round, me, tuple(complaints), cfg.bits, y).encode()

    def unmask(self, request: bytes) -> bytes:
        """Answer the server's survivor list with one share per named neighbour: the
        self-mask seed share of a survivor, the mask key share of a dropped one."""
        self._advance(Step.UNMASKING)
        cfg, me = self.config, self.client_id
        msg = expect(decode(request), UnmaskRequest, cfg.round, me)
        survivors, dropped = set(msg.survivors), set(msg.dropped)
        known = self._senders | {me}
        if survivors & dropped:
            raise MessageError(
                f"clients {sorted(survivors & dropped)} are named both survivor and "
                "dropped"
            )
        if not (survivors | dropped) <= known or me not in survivors:
            raise MessageError(
                "the unmask request names clients that did not share keys with this "
                "client, or drops this client"
            )

        # unmasking: at most one share per client, the kind fixed by the server's list
        shares = []
        for u in sorted(survivors | dropped):
            if u not in self._held:
                continue  # its shares failed authentication: nothing to reveal
            seed_share, key_share = self._held[u]
            if u in survivors:
                shares.append((u, SecretKind.SELF_MASK_SEED, seed_share))
            else:
                shares.append((u, SecretKind.MASK_KEY, key_share))
        self._held.clear()
        self._box_keys.clear()
        return UnmaskShares(cfg.round, me, tuple(shares)).encode()
