"""Custom Prometheus metrics of a replica (never labelled by user or item id).

Exported through Ray's metrics endpoint (prefixed `ray_`, counters suffixed `_total`) next to Serve's
built-in `ray_serve_batch_*` metrics. Ray stops exporting a gauge series that has not been set for a
while, so the state gauges (live build, its age, sidecar size, skew check) are set again at every tick
of the replica's follower (`state`), not only when they change.
"""

from __future__ import annotations

from ray.util import metrics

_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536]
_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]


class ReplicaMetrics:
    def __init__(self, application: str, replica: str):
        self.application, self.replica = application, replica
        tags = ("application", "replica")
        self.rows = metrics.Counter("skewless_scored_rows", "Candidate rows scored", tag_keys=tags)
        self.unique_users = metrics.Counter(
            "skewless_batch_unique_users", "Unique users looked up once per batch", tag_keys=tags
        )
        self.user_lookups = metrics.Counter(
            "skewless_user_table_lookups", "Rows gathered from the user-embedding table", tag_keys=tags
        )
        self.item_lookups = metrics.Counter(
            "skewless_item_table_lookups",
            "Rows gathered from the item-embedding table (shared candidates once per batch)",
            tag_keys=tags,
        )
        self.batch_rows = metrics.Histogram(
            "skewless_batch_rows", "Rows per scoring batch", boundaries=_SIZES, tag_keys=tags
        )
        self.batch_unique = metrics.Histogram(
            "skewless_batch_unique_users_hist",
            "Unique users per scoring batch",
            boundaries=_SIZES,
            tag_keys=tags,
        )
        self.cap_events = metrics.Counter(
            "skewless_cap_events",
            "Batches/requests past the unique-user cap, by policy",
            tag_keys=(*tags, "policy"),
        )
        self.request_errors = metrics.Counter(
            "skewless_request_errors",
            "Requests answered with an error, by status",
            tag_keys=(*tags, "status"),
        )
        self.swaps = metrics.Counter(
            "skewless_build_swaps", "Build loads, by outcome (swapped / refused)", tag_keys=(*tags, "outcome")
        )
        self.live_build = metrics.Gauge(
            "skewless_live_build",
            "1 for the build this replica serves",
            tag_keys=(*tags, "build_id", "checkpoint_version"),
        )
        self.sidecar_items = metrics.Gauge(
            "skewless_sidecar_items", "Fresh items served from the sidecar", tag_keys=tags
        )
        self.sidecar_ops = metrics.Counter(
            "skewless_sidecar_ops", "Sidecar writes accepted, by op (upsert / delete)", tag_keys=(*tags, "op")
        )
        self.skew_passed = metrics.Gauge(
            "skewless_skew_check_passed",
            "1 if the live checkpoint version has a passed skew check",
            tag_keys=(*tags, "family", "checkpoint_version"),
        )
        self.build_age_s = metrics.Gauge(
            "skewless_live_build_age_seconds",
            "Seconds since the live build's manifest was written (a stalled rebuild cadence shows here)",
            tag_keys=(*tags, "build_id"),
        )
        self.sidecar_skipped = metrics.Counter(
            "skewless_sidecar_entries_skipped",
            "Sidecar log entries this replica could not apply (malformed or not embeddable)",
            tag_keys=tags,
        )
        self.history_users = metrics.Counter(
            "skewless_history_users", "Unique users embedded from their history, per batch", tag_keys=tags
        )
        self.latency_ms = metrics.Histogram(
            "skewless_score_latency_ms", "Scoring batch compute time", boundaries=_MS, tag_keys=tags
        )

    def _t(self, **extra) -> dict:
        return {"application": self.application, "replica": self.replica, **extra}

    def batch(self, stats, latency_ms: float) -> None:
        if stats.rows:
            self.rows.inc(stats.rows, self._t())
        if stats.unique_users:
            self.unique_users.inc(stats.unique_users, self._t())
        if stats.user_lookups:
            self.user_lookups.inc(stats.user_lookups, self._t())
        if stats.item_lookups:
            self.item_lookups.inc(stats.item_lookups, self._t())
        if stats.history_users:
            self.history_users.inc(stats.history_users, self._t())
        self.batch_rows.observe(stats.rows, self._t())
        self.batch_unique.observe(stats.unique_users, self._t())
        for policy, n in stats.cap_events.items():
            self.cap_events.inc(n, self._t(policy=policy))
        self.latency_ms.observe(latency_ms, self._t())

    def error(self, status: int) -> None:
        self.request_errors.inc(1, self._t(status=str(status)))

    def swap(self, outcome: str, old, new) -> None:
        self.swaps.inc(1, self._t(outcome=outcome))
        if outcome == "swapped" and old is not None:  # the old build's series read 0 until Ray drops them
            self.live_build.set(0, self._t(build_id=old.build_id, checkpoint_version=old.checkpoint_version))
            family = old.manifest.checkpoint.family
            self.skew_passed.set(0, self._t(family=family, checkpoint_version=old.checkpoint_version))

    def state(self, serving, age_s: float | None) -> None:
        """Set every state gauge from the replica's current ServingState (called at each tick)."""
        if serving is None:
            return
        b = serving.build
        self.live_build.set(1, self._t(build_id=b.build_id, checkpoint_version=b.checkpoint_version))
        self.sidecar_items.set(len(serving.sidecar.ids), self._t())
        family = b.manifest.checkpoint.family
        self.skew_passed.set(
            int(serving.skew_check_passed), self._t(family=family, checkpoint_version=b.checkpoint_version)
        )
        if age_s is not None:
            self.build_age_s.set(round(age_s, 1), self._t(build_id=b.build_id))
