"""A Serve application with the real app's ingress shape that does no work: the serve_load baseline.

POST /score reads the raw body bytes (no JSON parsing, no validation) and returns a constant JSON;
GET /healthz answers at once. Deployed beside `serve_app.app:build_app` with the same request limits,
so latency and capacity measured through it are Serve's own cost (HTTP proxy, routing to the replica,
FastAPI dispatch) and the difference to the real app is the real app's work.

    python -m benchmarks.serve_load --registry REGISTRY      # deploys this as the `noop` application
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself through Serve's
# class-based ingress (see serve_app/app.py).
from fastapi import FastAPI, Request, Response
from ray import serve
from ray.serve import Application

from serve_app.schemas import DEPLOYMENT_LIMITS

api = FastAPI(title="skewless-noop")

# What the real app answers with, in shape only: its clients parse `scores`, `build_id`, `checkpoint_version`.
_BODY = b'{"scores":[0.0],"build_id":"noop","checkpoint_version":"noop"}'


# The real Recommender's limits: the same queueing and 503 shedding under load.
@serve.deployment(name="Noop", **DEPLOYMENT_LIMITS)
@serve.ingress(api)
class Noop:
    @api.get("/healthz")
    def healthz(self):
        return {"status": "ok", "build_id": "noop"}

    @api.post("/score")
    async def score(self, request: Request) -> Response:
        # The body is still received in full, as the real app must; it is just not parsed.
        await request.body()
        return Response(content=_BODY, media_type="application/json")


def build_noop_app(args: dict | None = None) -> Application:
    """`serve run benchmarks.noop_app:build_noop_app max_ongoing_requests=64` also works."""
    args = args or {}
    opts = {k: int(args[k]) for k in ("max_ongoing_requests", "max_queued_requests") if k in args}
    return Noop.options(**opts).bind()
