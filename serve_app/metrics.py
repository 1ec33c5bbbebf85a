"""Custom Prometheus metrics of a replica (never labelled by user or item id).

Request-level series (rows, latency, errors, scores) carry the `build_id` that served them, so during
a canary the live and the canary build sit side by side on the dashboard (`by (build_id)`).

Exported through Ray's metrics endpoint (prefixed `ray_`, counters suffixed `_total`) next to Serve's
built-in `ray_serve_batch_*` metrics. Ray stops exporting a gauge series that has not been set for a
while, so the state gauges (live build, its age, sidecar size, skew check) are set again at every tick
of the replica's follower (`state`), not only when they change.
"""

from __future__ import annotations

from ray.util import metrics


def resident_mib() -> float:
    """This process's resident memory (VmRSS), MiB: what GET /stats and GET /shards report."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024


_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536]
_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]


class ReplicaMetrics:
    def __init__(self, application: str, replica: str):
        self.application, self.replica = application, replica
        self._last_canary = None
        keys = ("application", "replica")
        by_build = (*keys, "build_id")
        self.rows = metrics.Counter("skewless_scored_rows", "Candidate rows scored", tag_keys=by_build)
        self.unique_users = metrics.Counter(
            "skewless_batch_unique_users", "Unique users looked up once per batch", tag_keys=keys
        )
        self.user_lookups = metrics.Counter(
            "skewless_user_table_lookups", "Rows gathered from the user-embedding table", tag_keys=keys
        )
        self.item_lookups = metrics.Counter(
            "skewless_item_table_lookups",
            "Rows gathered from the item-embedding table (shared candidates once per batch)",
            tag_keys=keys,
        )
        self.batch_rows = metrics.Histogram(
            "skewless_batch_rows", "Rows per scoring batch", boundaries=_SIZES, tag_keys=keys
        )
        self.batch_unique = metrics.Histogram(
            "skewless_batch_unique_users_hist",
            "Unique users per scoring batch",
            boundaries=_SIZES,
            tag_keys=keys,
        )
        self.cap_events = metrics.Counter(
            "skewless_cap_events",
            "Batches/requests past the unique-user cap, by policy",
            tag_keys=(*keys, "policy"),
        )
        self.request_errors = metrics.Counter(
            "skewless_request_errors",
            "Requests answered with an error, by status (build_id empty: refused before routing)",
            tag_keys=(*by_build, "status"),
        )
        self.swaps = metrics.Counter(
            "skewless_build_swaps", "Build loads, by outcome (swapped / refused)", tag_keys=(*keys, "outcome")
        )
        self.live_build = metrics.Gauge(
            "skewless_live_build",
            "1 for each build this replica serves, by role (live / canary)",
            tag_keys=(*keys, "build_id", "checkpoint_version", "role"),
        )
        self.canary_percent = metrics.Gauge(
            "skewless_canary_percent",
            "Percent of users the canary build serves (0: no canary)",
            tag_keys=keys,
        )
        self.request_ms = metrics.Histogram(
            "skewless_request_latency_ms",
            "Request latency inside the replica, from routing to answer, by the build that served it",
            boundaries=_MS,
            tag_keys=by_build,
        )
        self.top_score = metrics.Histogram(
            "skewless_top_score",
            "Highest score of each answered request, by build (a shifted distribution shows a drift)",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 2, 5, 10],  # Ray: positive only
            tag_keys=by_build,
        )
        self.sidecar_items = metrics.Gauge(
            "skewless_sidecar_items", "Fresh items served from the sidecar", tag_keys=keys
        )
        self.sidecar_ops = metrics.Counter(
            "skewless_sidecar_ops", "Sidecar writes accepted, by op (upsert / delete)", tag_keys=(*keys, "op")
        )
        self.skew_passed = metrics.Gauge(
            "skewless_skew_check_passed",
            "1 if the live checkpoint version has a passed skew check",
            tag_keys=(*keys, "family", "checkpoint_version"),
        )
        self.build_age_s = metrics.Gauge(
            "skewless_live_build_age_seconds",
            "Seconds since the live build's manifest was written (a stalled rebuild cadence shows here)",
            tag_keys=(*keys, "build_id"),
        )
        self.sidecar_skipped = metrics.Counter(
            "skewless_sidecar_entries_skipped",
            "Sidecar log entries this replica could not apply (malformed or not embeddable)",
            tag_keys=keys,
        )
        self.history_users = metrics.Counter(
            "skewless_history_users",
            "Unique users embedded from their request features by the user tower",
            tag_keys=keys,
        )
        self.partial_answers = metrics.Counter(
            "skewless_partial_answers",
            "Retrievals answered without every shard of their build (shard_partial: coverage < 1)",
            tag_keys=by_build,
        )
        self.latency_ms = metrics.Histogram(
            "skewless_score_latency_ms", "Scoring batch compute time", boundaries=_MS, tag_keys=by_build
        )

    def _t(self, **extra) -> dict:
        return {"application": self.application, "replica": self.replica, **extra}

    def batch(self, stats, latency_ms: float, build_id: str) -> None:
        if stats.rows:
            self.rows.inc(stats.rows, self._t(build_id=build_id))
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
        self.latency_ms.observe(latency_ms, self._t(build_id=build_id))

    def error(self, status: int, build_id: str = "") -> None:
        self.request_errors.inc(1, self._t(status=str(status), build_id=build_id))

    def answered(self, build_id: str, latency_ms: float, top_score: float | None) -> None:
        t = self._t(build_id=build_id)
        self.request_ms.observe(latency_ms, t)
        if top_score is not None:
            self.top_score.observe(top_score, t)

    def swap(self, outcome: str, old, new) -> None:
        self.swaps.inc(1, self._t(outcome=outcome))
        if outcome == "swapped" and old is not None:  # the old build's series read 0 until Ray drops them
            self.live_build.set(
                0, self._t(build_id=old.build_id, checkpoint_version=old.checkpoint_version, role="live")
            )
            family = old.manifest.checkpoint.family
            self.skew_passed.set(0, self._t(family=family, checkpoint_version=old.checkpoint_version))

    def state(self, routing, age_s: float | None) -> None:
        """Set every state gauge from the replica's current Routing (called at each tick)."""
        if routing is None:
            return
        serving = routing.live
        b = serving.build
        self.live_build.set(
            1, self._t(build_id=b.build_id, checkpoint_version=b.checkpoint_version, role="live")
        )
        c = routing.canary
        if c is not None:
            self.live_build.set(
                1,
                self._t(
                    build_id=c.build.build_id, checkpoint_version=c.build.checkpoint_version, role="canary"
                ),
            )
        elif self._last_canary is not None:  # ended (aborted or promoted): its canary series reads 0
            o = self._last_canary
            self.live_build.set(
                0, self._t(build_id=o.build_id, checkpoint_version=o.checkpoint_version, role="canary")
            )
        self._last_canary = None if c is None else c.build
        self.canary_percent.set(routing.percent, self._t())
        self.sidecar_items.set(len(serving.sidecar.ids), self._t())
        family = b.manifest.checkpoint.family
        self.skew_passed.set(
            int(serving.skew_check_passed), self._t(family=family, checkpoint_version=b.checkpoint_version)
        )
        if age_s is not None:
            self.build_age_s.set(round(age_s, 1), self._t(build_id=b.build_id))
