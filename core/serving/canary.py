"""Which users a canary build serves: a stable hash of the user id, salted by the canary's build id.

Every replica and every process computes the same bucket for a user (no state, no Python `hash()`,
whose salt differs per process), so one user sees one build on every replica and every request. The
salt gives each canary its own sample of users (one unlucky group is not every canary's test bed), and
a user in at P % stays in when the canary ramps up to any larger percentage.
"""

from __future__ import annotations

import hashlib

import numpy as np

BUCKETS = 10_000  # percentages are honoured to 0.01 %


def bucket(user_id: int, salt: str) -> int:
    """The user's bucket in [0, BUCKETS) for this salt."""
    h = hashlib.blake2b(
        int(user_id).to_bytes(8, "little", signed=True), digest_size=8, key=salt.encode()[:64]
    )
    return int.from_bytes(h.digest(), "little") % BUCKETS


def in_canary(user_id: int, salt: str, percent: float) -> bool:
    return bucket(user_id, salt) < percent * (BUCKETS // 100)


def share(user_ids: np.ndarray, salt: str, percent: float) -> float:
    """The share of these users a canary at `percent` serves."""
    return float(np.mean([in_canary(int(u), salt, percent) for u in user_ids])) if len(user_ids) else 0.0
