"""Secure aggregation messages over HTTP: JSON for keys and shares, safetensors for
the masked input.

The protocol's messages (:mod:`veil.secagg.messages`) have one byte layout, which the
state machines read and write. Over HTTP they travel as JSON (byte strings in
standard base64) except the masked input, whose vector is a safetensors tensor.
This module converts both ways and nothing more: the server rebuilds a client
message from the request body, with the round taken from the URL and the sender
from the device token (a device cannot name another sender), encodes it and hands
the bytes to :class:`~veil.secagg.SecAggServer`, whose checks then apply unchanged.

Client bodies (device to server):

- advertise keys: ``{"encryption_key", "mask_key", "seed_commitment"}`` (32 bytes
  each);
- share keys: ``{"ciphertexts": [{"client": recipient, "ciphertext"}]}``;
- masked input: safetensors with one tensor ``masked_input`` (1-D, the round's
  unsigned type, the round's length) and the metadata key ``complaints`` (a JSON
  list of client ids);
- unmasking: ``{"shares": [{"client", "kind": "self_mask_seed" | "mask_key",
  "share"}]}`` (33 bytes each).

Server messages (what ``GET /v1/rounds/{r}/secagg`` returns under ``"message"``)
carry every field of their dataclass, with ``"kind"`` naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from veil.errors import MessageError
from veil.secagg.fixedpoint import dtype_for_bits
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
from veil.secagg.shamir import SHARE_BYTES

__all__ = [
    "MASKED_INPUT",
    "client_body",
    "client_message",
    "masked_input_body",
    "masked_input_message",
    "server_json",
    "server_message",
]

#: The tensor name of the masked vector in a masked input body.
MASKED_INPUT = "masked_input"

# safetensors dtype names of the unsigned types a masked vector may have.
_UNSIGNED = {1: "U8", 2: "U16", 4: "U32", 8: "U64"}
_KIND_NAMES = {
    SecretKind.SELF_MASK_SEED: "self_mask_seed",
    SecretKind.MASK_KEY: "mask_key",
}


def b64(data: bytes) -> str:
    """``data`` in standard base64."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, size: int | None, what: str) -> bytes:
    """The bytes of base64 ``text``, of exactly ``size`` bytes when given."""
    if not isinstance(text, str):
        raise MessageError(f"{what} must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(f"{what} must be standard base64") from None
    if size is not None and len(raw) != size:
        raise MessageError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


# ---- server messages ----------------------------------------------------------


def server_json(data: bytes) -> dict[str, Any]:
    """A server message (protocol bytes) as the JSON a device receives."""
    m = decode(data)
    if isinstance(m, RoundConfig):
        return {
            "kind": "round_config",
            "round": m.round,
            "bits": m.bits,
            "length": m.length,
            "threshold": m.threshold,
            "neighbours": m.neighbours,
            "graph_seed": b64(m.graph_seed),
            "clients": list(m.clients),
        }
    if isinstance(m, KeysBroadcast):
        keys = [
            {
                "client": k.client,
                "encryption_key": b64(k.encryption_key),
                "mask_key": b64(k.mask_key),
                "seed_commitment": b64(k.seed_commitment),
            }
            for k in m.keys
        ]
        return {"kind": "keys_broadcast", "round": m.round, "recipient": m.recipient,
                "keys": keys}  # fmt: skip
    if isinstance(m, ForwardedShares):
        boxes = [{"client": c, "ciphertext": b64(blob)} for c, blob in m.ciphertexts]
        return {"kind": "forwarded_shares", "round": m.round,
                "recipient": m.recipient, "ciphertexts": boxes}  # fmt: skip
    if isinstance(m, UnmaskRequest):
        return {"kind": "unmask_request", "round": m.round, "recipient": m.recipient,
                "survivors": list(m.survivors), "dropped": list(m.dropped)}  # fmt: skip
    raise MessageError(f"{type(m).__name__} is not a server message")


def server_message(body: dict[str, Any]) -> bytes:
    """The protocol bytes of a server message received as JSON (device side)."""
    kind = body.get("kind")
    try:
        rnd = int(body["round"])
        if kind == "round_config":
            message: Message = RoundConfig(
                rnd,
                int(body["bits"]),
                int(body["length"]),
                int(body["threshold"]),
                int(body["neighbours"]),
                unb64(body["graph_seed"], 32, "graph_seed"),
                tuple(int(c) for c in body["clients"]),
            )
        elif kind == "keys_broadcast":
            message = KeysBroadcast(
                rnd,
                int(body["recipient"]),
                tuple(
                    ClientKeys(
                        int(k["client"]),
                        unb64(k["encryption_key"], 32, "encryption_key"),
                        unb64(k["mask_key"], 32, "mask_key"),
                        unb64(k["seed_commitment"], 32, "seed_commitment"),
                    )
                    for k in body["keys"]
                ),
            )
        elif kind == "forwarded_shares":
            message = ForwardedShares(
                rnd,
                int(body["recipient"]),
                tuple(
                    (int(c["client"]), unb64(c["ciphertext"], None, "ciphertext"))
                    for c in body["ciphertexts"]
                ),
            )
        elif kind == "unmask_request":
            message = UnmaskRequest(
                rnd,
                int(body["recipient"]),
                tuple(int(c) for c in body["survivors"]),
                tuple(int(c) for c in body["dropped"]),
            )
        else:
            raise MessageError(f"unknown server message kind {kind!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise MessageError(f"malformed {kind} message: {exc!r}") from None
    data = message.encode()
    decode(data)  # the strict parser's checks (sorted lists, sizes)
    return data


# ---- client messages ----------------------------------------------------------


def client_body(data: bytes) -> dict[str, Any]:
    """A client message (protocol bytes, not a masked input) as its JSON body."""
    m = decode(data)
    if isinstance(m, AdvertiseKeys):
        return {
            "encryption_key": b64(m.encryption_key),
            "mask_key": b64(m.mask_key),
            "seed_commitment": b64(m.seed_commitment),
        }
    if isinstance(m, SharedKeys):
        return {
            "ciphertexts": [
                {"client": c, "ciphertext": b64(blob)} for c, blob in m.ciphertexts
            ]
        }
    if isinstance(m, UnmaskShares):
        return {
            "shares": [
                {
                    "client": c,
                    "kind": _KIND_NAMES[kind],
                    "share": b64(value.to_bytes(SHARE_BYTES, "big")),
                }
                for c, kind, value in m.shares
            ]
        }
    raise MessageError(f"{type(m).__name__} is not sent as JSON")


def client_message(kind: type[Message], rnd: int, sender: int, body: Any) -> bytes:
    """The protocol bytes of the ``kind`` message ``sender`` sent as JSON ``body``
    for round ``rnd``; a :class:`MessageError` for a malformed body."""
    if not isinstance(body, dict):
        raise MessageError(f"body must be a JSON object, got {type(body).__name__}")
    try:
        if kind is AdvertiseKeys:
            message: Message = AdvertiseKeys(
                rnd,
                sender,
                unb64(body["encryption_key"], 32, "encryption_key"),
                unb64(body["mask_key"], 32, "mask_key"),
                unb64(body["seed_commitment"], 32, "seed_commitment"),
            )
        elif kind is SharedKeys:
            message = SharedKeys(
                rnd,
                sender,
                tuple(
                    (_id(c["client"]), unb64(c["ciphertext"], None, "ciphertext"))
                    for c in _list(body["ciphertexts"], "ciphertexts")
                ),
            )
        elif kind is UnmaskShares:
            message = UnmaskShares(rnd, sender, _shares(body["shares"]))
        else:
            raise MessageError(f"{kind.__name__} is not sent as JSON")
    except KeyError as exc:
        raise MessageError(f"body is missing the field {exc}") from None
    except (TypeError, AttributeError) as exc:
        raise MessageError(f"body has a field of the wrong type ({exc})") from None
    data = message.encode()
    decode(data)  # the strict parser's checks (sorted lists, sizes)
    return data


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MessageError(f"{what} must be a list, got {type(value).__name__}")
    return value


def _id(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise MessageError(
            f"a client id must be an integer in [0, 2**32), got {value!r}"
        )
    return value


def _shares(value: object) -> tuple[tuple[int, SecretKind, int], ...]:
    names = {v: k for k, v in _KIND_NAMES.items()}
    out = []
    for s in _list(value, "shares"):
        kind = names.get(s["kind"])
        if kind is None:
            raise MessageError(
                f"a share's kind must be one of {sorted(names)}, got {s['kind']!r}"
            )
        raw = unb64(s["share"], SHARE_BYTES, "share")
        out.append((_id(s["client"]), kind, int.from_bytes(raw, "big")))
    return tuple(out)


# ---- the masked input ---------------------------------------------------------


def masked_input_body(data: bytes) -> bytes:
    """A masked input message (protocol bytes) as its safetensors body."""
    m = decode(data)
    if not isinstance(m, MaskedInput):
        raise MessageError(f"expected a MaskedInput, got {type(m).__name__}")
    vector = np.ascontiguousarray(m.vector, dtype=dtype_for_bits(m.bits))
    return save({MASKED_INPUT: vector}, {"complaints": json.dumps(list(m.complaints))})


def masked_input_message(
    rnd: int, sender: int, bits: int, length: int, payload: bytes
) -> bytes:
    """The protocol bytes of the masked input ``sender`` uploaded as safetensors.

    The header is checked first (one tensor ``masked_input`` of the round's unsigned
    type and ``length`` elements, ``complaints`` metadata), then the tensor read.
    """
    header, metadata = _header(payload)
    want = _UNSIGNED[dtype_for_bits(bits).itemsize]
    entry = header.get(MASKED_INPUT)
    if set(header) != {MASKED_INPUT} or not isinstance(entry, dict):
        raise MessageError(
            f"body must hold exactly one tensor {MASKED_INPUT!r}, got {sorted(header)}"
        )
    if entry.get("dtype") != want or entry.get("shape") != [length]:
        raise MessageError(
            f"{MASKED_INPUT!r} must be {want} of shape [{length}], got "
            f"{entry.get('dtype')} of shape {entry.get('shape')}"
        )
    try:
        complaints = json.loads(metadata.get("complaints", "[]"))
        vector = load(payload)[MASKED_INPUT]
    except (json.JSONDecodeError, SafetensorError) as exc:
        raise MessageError(f"body is not a valid masked input ({exc})") from None
    ids = tuple(_id(c) for c in _list(complaints, "complaints"))
    data = MaskedInput(rnd, sender, ids, bits, vector).encode()
    decode(data)  # the strict parser's checks (sorted complaints)
    return data


def _header(payload: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    if len(payload) < 8:
        raise MessageError(f"body must be safetensors bytes, got {len(payload)} bytes")
    size = int.from_bytes(payload[:8], "little")
    if size > len(payload) - 8:
        raise MessageError(
            f"body is not valid safetensors: its header claims {size} bytes, only "
            f"{len(payload) - 8} follow"
        )
    try:
        header = json.loads(payload[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"body is not valid safetensors ({exc})") from None
    if not isinstance(header, dict):
        raise MessageError("body is not valid safetensors: header is not a map")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise MessageError("safetensors metadata must be a map of strings")
    return header, metadata
