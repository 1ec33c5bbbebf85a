"""Recommend `max_unique_users_per_batch` from the replicas' unique-users-per-batch histogram.

The cap bounds the broadcast path's per-batch buffer and its worst batch; a batch above it is split,
rejected or scored per row (`cap_policy`). The right size covers nearly every batch the traffic makes:
the smallest histogram boundary at or above which COVERAGE of the observed batches lie. The
histogram is `skewless_batch_unique_users_hist` (serve_app/metrics.py), in Prometheus' text format.
"""

from __future__ import annotations

import dataclasses
import math
import re

METRIC = "ray_skewless_batch_unique_users_hist"
_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclasses.dataclass(frozen=True)
class Histogram:
    bounds: tuple[float, ...]  # upper bounds ("le"), ascending, +inf last
    cumulative: tuple[float, ...]  # batches with at most that many unique users

    @property
    def total(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0


def _series(text: str, name: str, match: dict[str, str] | None):
    """(labels, value) of every `name` sample whose labels include `match`."""
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m["name"] == name:
            labels = dict(_LABEL.findall(m["labels"] or ""))
            if all(labels.get(k) == v for k, v in (match or {}).items()):
                yield labels, float(m["value"])


def parse_histogram(text: str, metric: str = METRIC, match: dict[str, str] | None = None) -> Histogram:
    """Sum the `metric` histogram's buckets over every series whose labels include `match` (e.g.
    {"application": "main"}: all its replicas)."""
    buckets: dict[float, float] = {}
    for labels, value in _series(text, f"{metric}_bucket", match):
        le = float(labels["le"].replace("+Inf", "inf"))
        buckets[le] = buckets.get(le, 0.0) + value
    bounds = tuple(sorted(buckets))
    return Histogram(bounds, tuple(buckets[b] for b in bounds))


@dataclasses.dataclass(frozen=True)
class Recommendation:
    cap: int  # max_unique_users_per_batch
    covered: float  # share of observed batches with at most `cap` unique users
    batches: int  # batches observed
    over_cap: int  # of them, how many had more (the cap policy handles them)


def recommend(h: Histogram, coverage: float = 0.999) -> Recommendation:
    """The smallest finite boundary covering `coverage` of the batches; ValueError when there is
    nothing to go on or only the +inf bucket covers it (the histogram's boundaries are too small)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    if h.total <= 0:
        raise ValueError("the histogram holds no batches yet: send traffic first (or run a short load)")
    for le, cum in zip(h.bounds, h.cumulative, strict=True):
        if cum >= coverage * h.total - 1e-9:
            if math.isinf(le):
                finite = [b for b in h.bounds if not math.isinf(b)]
                raise ValueError(
                    f"more than {100 * (1 - coverage):.3g}% of batches had over {int(finite[-1]) if finite else 0} "
                    "unique users, the histogram's largest boundary: the cap cannot be read from it"
                )
            return Recommendation(int(le), cum / h.total, int(h.total), int(h.total - cum))
    raise AssertionError("unreachable: the +inf bucket holds every batch")


def counter_sum(text: str, name: str, match: dict[str, str] | None = None) -> float:
    """Sum of a counter's series whose labels include `match` (e.g. rows scored by one application)."""
    return sum(value for _, value in _series(text, name, match))
