"""Deterministic, order-free seeds.

Every random choice in a run draws from a generator seeded by the run's seed and the
place it is used (what, round, client). A client's randomness therefore does not depend
on which other clients ran before it, or where, so the simulation, Ray and network
runtimes can reproduce each other's results.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Stream", "derive_seed", "numpy_rng", "torch_generator"]


class Stream:
    """Names of the random streams of a run (kept stable: results depend on them)."""

    MODEL_INIT = 0
    PARTITION = 1
    CLIENT_SAMPLING = 2
    LOCAL_TRAINING = 3
    CENTRALIZED = 4
    STANDALONE = 5
    CENTRAL_DP = 6
    DP_FEDAVG_NOISE = 70


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed determined by ``seed`` and the path ``keys``."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A NumPy generator for the stream ``(seed, *keys)``."""
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the stream ``(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
