"""Sharded serving on Ray Serve: one deployment per shard of a sharded build, and the ingress's fan-out.

    Recommender (ingress, HTTP)   user side: the build's user table and towers, the sidecar, routing
      |-- Shard0 (replicas = copies of shard 0)   shard 0's index + the item rows of its id range
      |-- Shard1 ...

Serve has no way to address one replica, so a shard is a deployment: any replica of `Shard<i>` can
answer for shard i. The ingress resolves the build once per request (live or canary) and every shard
call carries that build id; a replica that does not hold it says so (`NotHeld`) and the call is tried
again (another replica may hold it), then answered 503 + Retry-After: never a top-k missing a shard.
The ingress switches to a new build only once every shard answers that it holds it (two-phase), and
shards keep the builds they served for `shard_retain_s` after the switch, so pinned requests drain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import numpy as np
import ray
import torch
from ray import serve

from core.ann import index as ann
from core.ann import ivf_lists
from core.serving.scatter import ShardCall
from core.serving.shard_build import NotHeld, ShardHolder
from core.storage.store import location
from serve_app.metrics import resident_mib

log = logging.getLogger("skewless.serve")


class ShardUnavailable(RuntimeError):
    """A shard did not answer for the request's build after every try: the request gets a 503."""


@serve.deployment(name="Shard", max_ongoing_requests=64)
class ShardServer:
    """The replicas of one shard: each follows the registry and holds that shard of the live build, the
    canary, and for a while the builds it served before."""

    def __init__(self, args: dict):
        self.shard = int(args["shard"])
        self.rss_at_start = resident_mib()  # the process's fixed cost (Ray, torch, faiss), before any build
        torch.set_num_threads(int(args.get("torch_threads", 1)))
        ann.configure(int(args.get("faiss_threads", 1)))
        self.holder = ShardHolder(location(args["registry"]), self.shard, retain_s=float(args["retain_s"]))
        self.poll_s = float(args["poll_interval_s"])
        self.replica = serve.get_replica_context().replica_tag
        self._stop = threading.Event()
        self._tick()
        threading.Thread(target=self._follow, name="shard-follower", daemon=True).start()

    def _tick(self) -> None:
        try:
            self.holder.tick()
        except Exception:  # the follower must survive a flaky registry read
            log.exception("shard %d: registry poll failed; will retry", self.shard)

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._tick()

    def held(self) -> list[str]:
        return self.holder.held()

    def info(self) -> dict:
        """What this replica holds and its resident memory (GET /shards on the ingress)."""
        builds = {b: int(len(self.holder.get(b).item_ids)) for b in self.holder.held()}
        return {
            "shard": self.shard,
            "replica": self.replica,
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "builds": builds,
            "rss_mib": round(resident_mib(), 1),
            "rss_mib_at_start": round(self.rss_at_start, 1),
        }

    # search and score run on the replica's loop, not in a thread: a call's work is well under a
    # millisecond at serving batch sizes (0.3 ms for one query on a 250k-item IVF shard), and the thread
    # hop cost more CPU than it saved (benchmarks.serve_sharded: 10.8 vs 13.5 ms of shard CPU per request
    # on 2 cores). A replica is one core's worth of work (torch and faiss use one thread each).
    async def search(self, build_id: str, xq: np.ndarray, k: int):
        try:
            b = self.holder.get(build_id)
        except NotHeld as e:
            return "not_held", str(e)
        return "ok", b.search(xq, k)

    async def score(self, build_id: str, call: ShardCall):
        try:
            b = self.holder.get(build_id)
        except NotHeld as e:
            return "not_held", str(e)
        return "ok", b.score(call.users, call.pre, call.slots, call.item_ids, call.per_row)

    async def has(self, build_id: str, ids: np.ndarray):
        try:
            b = self.holder.get(build_id)
        except NotHeld as e:
            return "not_held", str(e)
        return "ok", b.has(ids)

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()


class Fanout:
    """The ingress's calls to every shard of a build, with the build id each request resolved."""

    def __init__(self, shards, attempts: int, timeout_s: float):
        """`shards`: the shard deployments' handles, or a function returning them (another application's
        deployments, looked up when first needed: that application may still be deploying). Made in
        the replica's constructor, which runs on the event loop its requests are served on."""
        self._shards = shards
        self.attempts, self.timeout_s = attempts, timeout_s
        # Handle calls are awaited on this loop: Serve's throughput-optimized mode runs the handles'
        # router on it, and then a response cannot be waited for synchronously (`.result()` raises).
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    @property
    def shards(self) -> list:
        if callable(self._shards):
            self._shards = self._shards()
        return self._shards

    async def _call(self, s: int, method: str, build_id: str, *args):
        why = ""
        for attempt in range(self.attempts):
            try:
                status, value = await asyncio.wait_for(
                    getattr(self.shards[s], method).remote(build_id, *args), self.timeout_s
                )
            except Exception as e:  # noqa: BLE001 - a dead or slow replica: try another
                status, value = "error", f"{type(e).__name__}: {e}"
            if status == "ok":
                return value
            why = value
            if attempt + 1 < self.attempts:
                await asyncio.sleep(0.05 * (attempt + 1))
        raise ShardUnavailable(
            f"shard {s} did not answer for build {build_id} ({self.attempts} tries): {why[:300]}"
        )

    async def search(
        self, build_id: str, xq: np.ndarray, k: int, partial: bool = False
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Top-k (ids, scores) (Q, k) over every shard, and how many shards answered: each answers its
        top-k, the lists are merged. A shard that does not answer raises ShardUnavailable, unless
        `partial` (then only if none answered)."""
        got = await asyncio.gather(
            *(self._call(s, "search", build_id, xq, k) for s in range(len(self.shards))),
            return_exceptions=partial,
        )
        answered = [g for g in got if not isinstance(g, BaseException)]
        if not answered:
            raise next(g for g in got if isinstance(g, BaseException))
        if len(answered) < len(got):
            missing = [s for s, g in enumerate(got) if isinstance(g, BaseException)]
            log.warning(
                "build %s: partial answer without shard(s) %s: %s", build_id, missing, got[missing[0]]
            )
        scores, ids = ivf_lists.merge_proposals(answered, k)
        return ids, scores, len(answered)

    async def score(
        self, build_id: str, calls: dict[int, ShardCall]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        got = await asyncio.gather(*(self._call(s, "score", build_id, c) for s, c in calls.items()))
        return dict(zip(calls, got, strict=True))

    async def has(self, build_id: str, shard: int, ids: np.ndarray) -> np.ndarray:
        return await self._call(shard, "has", build_id, ids)

    async def info(self) -> list[dict]:
        async def one(s):
            try:
                return await asyncio.wait_for(self.shards[s].info.remote(), self.timeout_s)
            except Exception as e:  # noqa: BLE001 - reported, not raised: this is a status page
                return {"shard": s, "error": f"{type(e).__name__}: {e}"}

        return list(await asyncio.gather(*(one(s) for s in range(len(self.shards)))))

    async def _held_everywhere(self, build_id: str, probes: int) -> bool:
        for h in self.shards:
            for _ in range(probes):
                if build_id not in await asyncio.wait_for(h.held.remote(), self.timeout_s):
                    return False
        return True

    def ready(self, build_id: str, probes: int = 3) -> bool:
        """Whether every shard holds the build: asked `probes` times per shard (calls may land on
        different replicas). Blocking, for the ingress's registry follower thread; the calls run on the
        replica's loop. Asked on that loop itself (the constructor's first poll): not yet, the follower
        asks again at its next poll."""
        try:
            asyncio.get_running_loop()
            return False
        except RuntimeError:
            pass
        try:
            if self._loop is None:  # no loop at construction: the router runs in its own
                return asyncio.run(self._held_everywhere(build_id, probes))
            done = asyncio.run_coroutine_threadsafe(self._held_everywhere(build_id, probes), self._loop)
            return done.result(timeout=self.timeout_s * probes * len(self.shards) + 5)
        except Exception as e:  # noqa: BLE001 - a shard still starting: not ready yet
            log.info("shards not ready for build %s: %s", build_id, e)
            return False


def shard_apps(args, n: int) -> list:
    """The shard deployments of an app serving builds of `n` shards (Serve config: deployments named
    Shard0..Shard<n-1> set their replicas and resources)."""
    common = {"registry": args.registry, "poll_interval_s": args.poll_interval_s, "retain_s": args.shard_retain_s,
              "torch_threads": args.torch_threads, "faiss_threads": args.faiss_threads}  # fmt: skip
    return [ShardServer.options(name=f"Shard{i}").bind({**common, "shard": i}) for i in range(n)]
