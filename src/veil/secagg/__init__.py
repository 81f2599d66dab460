"""Secure aggregation: the server learns the sum of the clients' updates, nothing else.

The protocol of Bonawitz et al. (CCS 2017) and its SecAgg+ form (Bell et al., CCS
2020), on the ``cryptography`` package (X25519, HKDF-SHA256, AES-GCM, ChaCha20). A
round has four steps: advertise keys, share keys, masked input, unmasking. It survives
clients dropping out at any step while at least ``threshold`` remain, aborts below,
and never reveals one client's input.

Layers, from the bottom:

- :mod:`~veil.secagg.fixedpoint`: clipped real vectors to integers modulo ``2**bits``;
- :mod:`~veil.secagg.shamir`, :mod:`~veil.secagg.crypto`: secret sharing, keys,
  authenticated encryption, mask expansion;
- :mod:`~veil.secagg.graph`: who masks with whom (full graph or k-regular);
- :mod:`~veil.secagg.messages`: the wire format;
- :class:`SecAggClient`, :class:`SecAggServer`: the state machines;
- :func:`secure_sum`: one round driven in this process (the simulation runtime).

It knows nothing of models: callers flatten and encode their tensors.
"""

from veil.secagg._common import Step
from veil.secagg.client import SecAggClient
from veil.secagg.driver import Intercept, SecureSum, secure_sum
from veil.secagg.fixedpoint import FixedPoint, dtype_for_bits
from veil.secagg.graph import choose_degree, min_threshold, threshold_for
from veil.secagg.server import SecAggServer

__all__ = [
    "FixedPoint",
    "Intercept",
    "SecAggClient",
    "SecAggServer",
    "SecureSum",
    "Step",
    "choose_degree",
    "dtype_for_bits",
    "min_threshold",
    "secure_sum",
    "threshold_for",
]
