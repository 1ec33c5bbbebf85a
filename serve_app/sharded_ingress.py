"""The ingress's side of sharded serving, mixed into the Recommender deployment (serve_app/app.py).

With shard deployments (serve_app/sharded.py) the ingress loads only a build's user side; it switches
to a build once every shard holds it; a scoring batch does the user side here and scatters its rows by
item id (core/serving/scatter.py); a retrieval batch computes query vectors here, searches every shard
for the request's build and merges with the sidecar. A shard that does not answer fails the batch's
requests with 503 + Retry-After, never with an incomplete answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from core.serving.broadcast import ScoreRequest, ScoreResult
from core.serving.scatter import gather_scores, plan_scores
from core.serving.serving_state import RetrieveQuery, ServingState, merge_sidecar, query_vectors, search_depth
from core.serving.shard_build import ShardedLiveBuild, load_user_side
from serve_app.sharded import ShardUnavailable

log = logging.getLogger("skewless.serve")


class ShardedIngress:
    """Needs the deployment's `args`, `fanout`, `bcfg`, `metrics` and `totals`."""

    def _user_side(self, build_dir, query, pair_allowed) -> ShardedLiveBuild:
        """Sharded serving: the ingress loads a build's user side only, for as many shards as deployed."""
        build = load_user_side(build_dir, query, pair_allowed)
        if build.n_shards != self.args.shards:
            raise ValueError(
                f"build {build.build_id} has {build.n_shards} shards, this app deploys {self.args.shards} "
                f"shard deployments: redeploy it (`shards` in the app's args) to serve that build"
            )
        return build

    def _shards_ready(self, build: ShardedLiveBuild) -> bool:
        return self.fanout.ready(build.build_id)

    async def _score_sharded(self, live: ShardedLiveBuild, requests: list[ScoreRequest], t0: float):
        """The user side here, once per unique user of the batch; each row's pair part on its item's
        shard (core/serving/scatter.py); a shard that does not answer fails this batch with a 503."""
        try:
            plan = await asyncio.to_thread(plan_scores, live, requests, self.bcfg.enabled)
            answers = await self.fanout.score(live.build_id, plan.calls)
        except ShardUnavailable as e:
            log.warning("scoring batch on build %s: %s", live.build_id, e)
            return [ScoreResult(status=503, error=str(e)) for _ in requests]
        results, stats = gather_scores(live, plan, answers), plan.stats
        self.metrics.batch(stats, (time.perf_counter() - t0) * 1000, live.build_id)
        self.totals.update(batches=1, rows=stats.rows, unique_users=stats.unique_users, user_lookups=stats.user_lookups,
                           item_lookups=stats.item_lookups, history_users=stats.history_users)  # fmt: skip
        return results

    async def _retrieve_sharded(self, state: ServingState, queries: list[RetrieveQuery]):
        """Query vectors here; every shard searched for the request's build; merged with the sidecar.
        A shard that does not answer: every query of the group gets ShardUnavailable (503), never a
        top-k without that shard's items, unless the app allows partial answers (`shard_partial`):
        then each answer carries its coverage (shards answered, shards)."""
        try:
            xq, embedded = await asyncio.to_thread(query_vectors, state.build, queries)
            ids, scores, answered = await self.fanout.search(
                state.build.build_id, xq, search_depth(state, queries), self.args.shard_partial
            )
            coverage = (answered, state.build.n_shards)
            if answered < coverage[1]:  # a degraded answer: on the dashboard, not only in GET /stats
                self.totals.update(partial_answers=len(queries))
                self.metrics.partial_answers.inc(len(queries), self.metrics._t(build_id=state.build.build_id))
            results = merge_sidecar(state, queries, xq, ids, scores)
            return [dataclasses.replace(r, coverage=coverage) for r in results], embedded
        except ShardUnavailable as e:
            log.warning("retrieval batch on build %s: %s", state.build.build_id, e)
            return [e] * len(queries), 0
        except Exception as e:  # noqa: BLE001 - reported to these requests only
            log.exception("sharded retrieval failed")
            return [e] * len(queries), 0
